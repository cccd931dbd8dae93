"""HTML pages through BeautifulSoup: boilerplate stripped, headings, lists and tables kept."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from bs4 import BeautifulSoup, Comment, Tag

from engine.documents.base import Document, Work, markdown_table, sectioned_document
from engine.errors import DocumentError

_DROP = (
    "script", "style", "noscript", "template", "nav", "aside", "iframe", "svg", "canvas",
    "object", "embed", "button", "select", "head",
)  # fmt: skip
_DROP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
_BLOCKS = (
    "p", "div", "section", "article", "main", "ul", "ol", "dl", "dt", "dd", "blockquote",
    "pre", "hr", "figure", "figcaption", "address", "tr", "header", "footer", "details",
)  # fmt: skip
# Private-use characters stand for breaks while whitespace inside the text is collapsed.
_PARAGRAPH, _LINE = "\ue000", "\ue001"


def read_html(path: Path, work: Work) -> Document:
    """Read the main content of an HTML page into sections."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"{path.name} cannot be read ({exc.strerror}).") from exc
    work.check()
    with warnings.catch_warnings():
        # bs4 warns about markup that looks like a file name or is XHTML; neither matters here.
        warnings.simplefilter("ignore")
        soup = BeautifulSoup(data, "lxml")
    return sectioned_document(path, "html", html_text(soup), work)


def html_text(soup: BeautifulSoup) -> str:
    """The readable text of a parsed page, with # headings, - list items and Markdown tables."""
    _strip_boilerplate(soup)
    root = soup.find("main") or soup.find("article") or soup.body or soup
    for element in root.find_all(re.compile(r"^h[1-6]$")):
        level = int(element.name[1])
        element.replace_with(f"{_PARAGRAPH}{'#' * level} {_inline(element)}{_PARAGRAPH}")
    for element in root.find_all("table"):
        if element.find_parent("table") is None:
            element.replace_with(_PARAGRAPH + _table(element).replace("\n", _LINE) + _PARAGRAPH)
    for element in root.find_all("li"):
        element.insert(0, f"{_LINE}- ")
    for element in root.find_all("br"):
        element.replace_with(_LINE)
    for element in root.find_all(_BLOCKS):
        element.insert_before(_PARAGRAPH)
        element.insert_after(_PARAGRAPH)
    text = re.sub(r"\s+", " ", "".join(root.strings))
    text = text.replace(_LINE, "\n").replace(_PARAGRAPH, "\n\n")
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _strip_boilerplate(soup: BeautifulSoup) -> None:
    for comment in soup.find_all(string=lambda s: isinstance(s, Comment)):
        comment.extract()
    doomed = list(soup.find_all(_DROP))
    # A header inside an article is its title block; the site's own header is chrome.
    doomed += [
        e for e in soup.find_all(["header", "footer"]) if not e.find_parent(["article", "main"])
    ]
    doomed += [e for e in soup.find_all(True, attrs={"role": True}) if e.get("role") in _DROP_ROLES]
    doomed += soup.find_all(True, attrs={"aria-hidden": "true"})
    for element in doomed:
        if isinstance(element, Tag) and not element.decomposed:
            element.decompose()


def _inline(element: Tag) -> str:
    return " ".join(element.get_text(" ").split())


def _table(table: Tag) -> str:
    rows = []
    for row in table.find_all("tr"):
        cells = [_inline(cell).replace("|", "\\|") for cell in row.find_all(["th", "td"])]
        if any(cells):
            rows.append(cells)
    return markdown_table(rows) if rows else ""

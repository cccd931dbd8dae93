"""HTML pages through BeautifulSoup: boilerplate stripped, headings, lists and tables kept."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from bs4 import BeautifulSoup, CData, NavigableString, PageElement, Tag

from engine.documents.base import Document, Work, markdown_table, sectioned_document
from engine.errors import DocumentError

_DROP = {
    "script", "style", "noscript", "template", "nav", "aside", "iframe", "svg", "canvas",
    "object", "embed", "button", "select", "head",
}  # fmt: skip
_DROP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search"}
_BLOCKS = {
    "p", "div", "section", "article", "main", "ul", "ol", "dl", "dt", "dd", "blockquote",
    "pre", "hr", "figure", "figcaption", "address", "tr", "header", "footer", "details",
}  # fmt: skip
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
    """The readable text of a parsed page, with # headings, - list items and Markdown tables.

    One iterative walk that emits text and skips boilerplate subtrees: no recursion (pages
    can nest thousands deep) and no tree edits (bs4 inserts are O(siblings)).
    """
    root = soup.find("main") or soup.find("article") or soup.body or soup
    out: list[str] = []
    stack: list[PageElement | str] = [root] if isinstance(root, Tag) else []
    while stack:
        node = stack.pop()
        if isinstance(node, NavigableString):
            if type(node) in (NavigableString, CData):  # not comments, doctypes, ...
                out.append(str(node))
        elif isinstance(node, str):
            out.append(node)  # a break marker or rendered block pushed by _expand
        elif isinstance(node, Tag) and not _is_boilerplate(node):
            stack.extend(_expand(node))
    text = re.sub(r"\s+", " ", "".join(out))
    text = text.replace(_LINE, "\n").replace(_PARAGRAPH, "\n\n")
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _expand(tag: Tag) -> list[PageElement | str]:
    """What to push for `tag`, in reverse order (the stack pops the last item first)."""
    name = tag.name
    if re.fullmatch(r"h[1-6]", name):
        return [f"{_PARAGRAPH}{'#' * int(name[1])} {_inline(tag)}{_PARAGRAPH}"]
    if name == "table":
        return [_PARAGRAPH + _table(tag).replace("\n", _LINE) + _PARAGRAPH]
    if name == "br":
        return [_LINE]
    children: list[PageElement | str] = list(reversed(tag.contents))
    if name == "li":
        return [*children, f"{_LINE}- "]
    if name in _BLOCKS:
        return [_PARAGRAPH, *children, _PARAGRAPH]
    return children


def _is_boilerplate(tag: Tag) -> bool:
    if tag.name in _DROP or tag.get("aria-hidden") == "true" or tag.get("role") in _DROP_ROLES:
        return True
    # A header inside an article is its title block; the site's own header is chrome.
    return tag.name in ("header", "footer") and tag.find_parent(["article", "main"]) is None


def _inline(element: Tag) -> str:
    return " ".join(element.get_text(" ").split())


def _table(table: Tag) -> str:
    rows = []
    for row in table.find_all("tr"):
        cells = [_inline(cell).replace("|", "\\|") for cell in row.find_all(["th", "td"])]
        if any(cells):
            rows.append(cells)
    return markdown_table(rows) if rows else ""

"""Word (.docx) files through python-docx: paragraphs, headings marked with #, tables in Markdown."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import docx
from docx.document import Document as DocxDocument
from docx.table import Table
from docx.text.paragraph import Paragraph

from engine.documents.base import Document, Work, markdown_table, sectioned_document
from engine.errors import DocumentError, QuireError

_HEADING = re.compile(r"^heading (\d)$", re.IGNORECASE)


def read_docx(path: Path, work: Work) -> Document:
    """Read the body of a .docx (already checked against zip bombs) into sections."""
    try:
        document = docx.Document(str(path))
        blocks = list(_blocks(document, work))
    except QuireError:
        raise
    except Exception as exc:  # a damaged package fails anywhere inside python-docx or lxml
        raise DocumentError(
            f"{path.name} is damaged and cannot be read as a Word document. Open it in Word "
            "and save it again, or export it as PDF."
        ) from exc
    return sectioned_document(path, "docx", "\n\n".join(blocks), work)


def _blocks(document: DocxDocument, work: Work) -> Iterator[str]:
    for index, item in enumerate(document.iter_inner_content()):
        if index % 200 == 0:
            work.check()
        text = _paragraph(item) if isinstance(item, Paragraph) else _table(item)
        if text:
            yield text


def _paragraph(paragraph: Paragraph) -> str:
    text = paragraph.text.strip()
    if not text:
        return ""
    style = paragraph.style.name if paragraph.style is not None else ""
    style = style or ""
    match = _HEADING.match(style)
    if match:
        return "#" * int(match.group(1)) + " " + text
    if style == "Title":
        return "# " + text
    if style.startswith("List"):
        return "- " + text
    return text


def _table(table: Table) -> str:
    rows = [[_cell(cell.text) for cell in row.cells] for row in table.rows]
    rows = [row for row in rows if any(row)]
    if not rows:
        return ""
    return markdown_table(rows)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")

"""Spreadsheets (.xlsx through openpyxl, CSV): grids with column letters and row numbers.

Each sheet becomes a Markdown table whose header is the column letters and whose first
column is the row number, so the model can name a cell as B7. Sheets longer than one
section are cut into row ranges, each repeating the letter header.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path

import openpyxl
from openpyxl.utils import get_column_letter

from engine.documents.base import SECTION_CHARS, Document, Page, Work
from engine.documents.text import open_text
from engine.errors import DocumentError, QuireError

Row = tuple[int, list[str]]  # (1-based row number, cell texts)
_CHECK_EVERY = 2000  # rows between cancel checks


def read_xlsx(path: Path, work: Work) -> Document:
    """Read every worksheet of a workbook (already checked against zip bombs)."""
    pages: list[Page] = []
    try:
        workbook = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
        try:
            sheets = workbook.worksheets
            for index, sheet in enumerate(sheets):
                work.check()
                rows = _sheet_rows(sheet.iter_rows(values_only=True), work)
                pages.extend(grid_pages(sheet.title, rows, first_number=len(pages) + 1))
                work.report(index + 1, len(sheets))
        finally:
            workbook.close()
    except QuireError:
        raise
    except Exception as exc:  # a damaged package fails anywhere inside openpyxl or lxml
        raise DocumentError(
            f"{path.name} is damaged and cannot be read as an Excel workbook. Open it in Excel "
            "and save it again, or export the sheets as CSV."
        ) from exc
    return Document(path=path, kind="xlsx", pages=tuple(pages))


def read_csv(path: Path, work: Work) -> Document:
    """Read a CSV or TSV file (delimiter sniffed) as one grid."""
    rows: list[Row] = []
    with open_text(path, work) as (stream, position):
        dialect = _sniff_dialect(stream.read(64 * 1024), path.suffix.lower())
        stream.seek(0)
        try:
            for number, cells in enumerate(csv.reader(stream, dialect), start=1):
                if number % _CHECK_EVERY == 0:
                    work.check()
                    work.report(position.done, position.size)
                texts = [format_cell(cell) for cell in cells]
                if any(texts):
                    rows.append((number, texts))
        except csv.Error as exc:
            raise DocumentError(
                f"{path.name} is not a well-formed CSV file ({exc}). Open it in a spreadsheet "
                "program and save it again as CSV."
            ) from exc
    work.report(position.size, position.size)
    return Document(path=path, kind="csv", pages=tuple(grid_pages(path.name, rows, 1)))


def _sniff_dialect(sample: str, suffix: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        return csv.excel_tab if suffix == ".tsv" else csv.excel


def _sheet_rows(values: Iterable[tuple[object, ...]], work: Work) -> list[Row]:
    rows = []
    for number, row in enumerate(values, start=1):
        if number % _CHECK_EVERY == 0:
            work.check()
        texts = [format_cell(value) for value in row]
        if any(texts):
            rows.append((number, texts))
    return rows


def format_cell(value: object) -> str:
    """A cell value as Markdown-safe text: 3.0 -> "3", dates in ISO form, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "TRUE" if value else "FALSE"
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        text = str(int(value))
    elif isinstance(value, dt.datetime) and value.time() == dt.time(0):
        text = value.date().isoformat()
    elif isinstance(value, dt.date | dt.time):
        text = value.isoformat()
    else:
        text = str(value)
    return " ".join(text.split()).replace("|", "\\|")


def grid_pages(name: str, rows: list[Row], first_number: int) -> list[Page]:
    """Cut a sheet's rows into sections titled by sheet name (and row range when cut)."""
    if not rows:
        return [Page(first_number, "(empty sheet)", f"section {first_number}", name)]
    width = max(len(_trimmed(cells)) for _, cells in rows)
    header = "| | " + " | ".join(get_column_letter(i + 1) for i in range(width)) + " |"
    header += "\n|---|" + "---|" * width
    chunks = list(_chunks(rows, width, SECTION_CHARS - len(header)))
    pages = []
    for offset, chunk in enumerate(chunks):
        number = first_number + offset
        title = name if len(chunks) == 1 else f"{name}, rows {chunk[0][0]}-{chunk[-1][0]}"
        body = "\n".join(line for _, line in chunk)
        pages.append(Page(number, f"{header}\n{body}", f"section {number}", title))
    return pages


def _trimmed(cells: list[str]) -> list[str]:
    end = len(cells)
    while end and not cells[end - 1]:
        end -= 1
    return cells[:end]


def _chunks(rows: list[Row], width: int, budget: int) -> Iterator[list[tuple[int, str]]]:
    chunk: list[tuple[int, str]] = []
    used = 0
    for number, cells in rows:
        cells = _trimmed(cells)
        cells += [""] * (width - len(cells))
        line = f"| {number} | " + " | ".join(cells) + " |"
        if chunk and used + len(line) > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append((number, line))
        used += len(line) + 1
    if chunk:
        yield chunk

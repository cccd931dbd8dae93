"""Spreadsheets: per-sheet grids with cell references, long sheets cut into row ranges, CSV."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import openpyxl
import pytest

from engine.documents import read_document
from engine.errors import DocumentError


def write_xlsx(path: Path, num_long_rows: int = 0) -> Path:
    workbook = openpyxl.Workbook()
    budget = workbook.active
    budget.title = "Budget"
    budget.append(["Item", "Cost", "Approved"])
    budget.append(["Servers", 1200.0, True])
    budget.append(["Travel", 310.5, False])
    budget["B6"] = dt.datetime(2026, 3, 1)
    notes = workbook.create_sheet("Notes")
    notes["C2"] = "Review | in April"
    workbook.create_sheet("Empty")
    if num_long_rows:
        log = workbook.create_sheet("Log")
        for index in range(num_long_rows):
            log.append([index, f"event number {index} recorded by the system"])
    workbook.save(str(path))
    return path


def test_each_sheet_is_a_grid_with_cell_references(tmp_path: Path) -> None:
    document = read_document(write_xlsx(tmp_path / "budget.xlsx"))

    assert document.kind == "xlsx"
    assert [page.title for page in document.pages] == ["Budget", "Notes", "Empty"]
    assert [page.label for page in document.pages] == ["section 1", "section 2", "section 3"]
    assert document.pages[0].text == (
        "| | A | B | C |\n|---|---|---|---|\n"
        "| 1 | Item | Cost | Approved |\n"
        "| 2 | Servers | 1200 | TRUE |\n"
        "| 3 | Travel | 310.5 | FALSE |\n"
        "| 6 |  | 2026-03-01 |  |"
    )
    assert document.pages[1].text.endswith("| 2 |  |  | Review \\| in April |")
    assert document.pages[2].text == "(empty sheet)"
    assert "[section 2] Notes" in document.as_prompt_text()


def test_long_sheet_is_cut_into_row_ranges_repeating_the_letters(tmp_path: Path) -> None:
    document = read_document(write_xlsx(tmp_path / "log.xlsx", num_long_rows=300))

    log_pages = [page for page in document.pages if page.title.startswith("Log")]
    assert len(log_pages) >= 3
    assert log_pages[0].title.startswith("Log, rows 1-")
    assert log_pages[-1].title.endswith("-300")
    assert all(page.text.startswith("| | A | B |\n|---|---|---|\n") for page in log_pages)
    assert all(len(page.text) <= 3000 for page in log_pages)
    assert "| 300 | 299 | event number 299 recorded by the system |" in log_pages[-1].text


def test_damaged_xlsx_is_a_clear_error(tmp_path: Path) -> None:
    path = write_xlsx(tmp_path / "broken.xlsx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DocumentError, match="damaged"):
        read_document(path)


def test_csv_with_semicolons_in_cp1252(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_bytes("Produit;Prix\nCafé;2,50\n\nThé;3,10\n".encode("cp1252"))

    document = read_document(path)

    assert document.kind == "csv"
    assert document.pages[0].title == "prices.csv"
    assert document.pages[0].text == (
        "| | A | B |\n|---|---|---|\n| 1 | Produit | Prix |\n| 2 | Café | 2,50 |\n| 4 | Thé | 3,10 |"
    )


def test_tsv_with_quoted_fields(tmp_path: Path) -> None:
    path = tmp_path / "people.tsv"
    path.write_text('name\tcity\n"Doe, Jane"\tOslo\n', encoding="utf-8")

    text = read_document(path).pages[0].text

    assert "| 2 | Doe, Jane | Oslo |" in text

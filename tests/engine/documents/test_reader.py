"""read_document: type sniffing, limits, progress and cancel, for every format."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from engine.documents import read_document
from engine.documents import text as text_module
from engine.errors import CancelledError, DocumentError, UnsupportedFileError
from tests.engine.documents.builders import write_pdf


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.touch()

    with pytest.raises(DocumentError, match="is empty \\(0 bytes\\)"):
        read_document(path)


def test_absurdly_large_text_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "dump.txt"
    with path.open("wb") as file:
        file.write(b"log line\n" * 1000)
        file.truncate(3 << 30)  # sparse: 3 GiB on paper, a few KiB on disk

    with pytest.raises(DocumentError, match="3.0 GiB of text") as caught:
        read_document(path)
    assert "Split it" in caught.value.user_message


def test_html_too_large_to_parse_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "archive.html"
    with path.open("wb") as file:
        file.write(b"<html><body>" + b"<p>text</p>" * 100)
        file.truncate(65 << 20)

    with pytest.raises(DocumentError, match="65 MiB of text"):
        read_document(path)


def test_missing_file_and_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match="was not found"):
        read_document(tmp_path / "gone.pdf")
    with pytest.raises(UnsupportedFileError, match="is a folder"):
        read_document(tmp_path)


def test_image_is_sent_to_the_image_area(tmp_path: Path) -> None:
    path = tmp_path / "whiteboard.pdf"
    Image.new("RGB", (20, 20), "white").save(path, format="PNG")

    with pytest.raises(UnsupportedFileError, match="is a PNG image") as caught:
        read_document(path)
    assert "image area" in caught.value.user_message


def test_unknown_binary_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4)

    with pytest.raises(UnsupportedFileError, match="binary data"):
        read_document(path)


def test_pdf_renamed_txt_is_read_as_pdf(report_pdf: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "report.txt"
    renamed.write_bytes(report_pdf.read_bytes())

    assert read_document(renamed).kind == "pdf"


def _many_pages(tmp_path: Path) -> dict[str, Path]:
    import docx
    import openpyxl

    paths = {"pdf": write_pdf(tmp_path / "a.pdf", [f"page {n}" for n in range(1, 8)])}
    text = "\n\n".join(f"Paragraph {n}. " + "word " * 200 for n in range(30))
    paths["text"] = tmp_path / "a.txt"
    paths["text"].write_text(text, encoding="utf-8")
    paths["html"] = tmp_path / "a.html"
    paths["html"].write_text(f"<html><body><p>{text}</p></body></html>", encoding="utf-8")
    word = docx.Document()
    for line in text.split("\n\n"):
        word.add_paragraph(line)
    paths["docx"] = tmp_path / "a.docx"
    word.save(str(paths["docx"]))
    workbook = openpyxl.Workbook()
    for n in range(3):
        workbook.create_sheet(f"S{n}")["A1"] = n
    paths["xlsx"] = tmp_path / "a.xlsx"
    workbook.save(str(paths["xlsx"]))
    paths["csv"] = tmp_path / "a.csv"
    paths["csv"].write_text("a,b\n" * 5000, encoding="utf-8")
    return paths


@pytest.mark.parametrize("kind", ["pdf", "text", "html", "docx", "xlsx", "csv"])
def test_progress_is_monotone_and_ends_at_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 4096)
    calls: list[tuple[int, int]] = []

    read_document(_many_pages(tmp_path)[kind], progress=lambda d, t: calls.append((d, t)))

    assert len(calls) >= 2
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len({total for _, total in calls}) == 1
    assert calls[-1][0] == calls[-1][1] > 0


def test_pdf_progress_counts_pages(report_pdf: Path) -> None:
    calls: list[tuple[int, int]] = []

    read_document(report_pdf, progress=lambda d, t: calls.append((d, t)))

    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("kind", ["pdf", "text", "docx", "csv"])
def test_cancel_mid_document_stops_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 4096)  # several reads for a 30 KB text
    calls: list[tuple[int, int]] = []

    with pytest.raises(CancelledError):
        read_document(
            _many_pages(tmp_path)[kind],
            progress=lambda d, t: calls.append((d, t)),
            is_cancelled=lambda: len(calls) >= 1,
        )
    assert len(calls) == 1 and calls[0][0] < calls[0][1]

"""Word documents: headings, paragraphs and tables, sections, damage and zip bombs."""

from __future__ import annotations

import zipfile
from pathlib import Path

import docx
import pytest

from engine.documents import read_document, sniff
from engine.errors import DocumentError, UnsupportedFileError


def write_docx(path: Path, num_filler_paragraphs: int = 0) -> Path:
    document = docx.Document()
    document.add_heading("Service agreement", level=1)
    document.add_paragraph("This agreement starts on 1 May 2026.")
    document.add_heading("Fees", level=2)
    table = document.add_table(rows=3, cols=2)
    for row, cells in zip(table.rows, [("Item", "Fee"), ("Support", "1200 EUR"), ("A|B", "5")]):
        row.cells[0].text, row.cells[1].text = cells
    document.add_paragraph("Invoices are due within 30 days.", style="List Bullet")
    for index in range(num_filler_paragraphs):
        document.add_paragraph(f"Clause {index}: " + "the parties agree to cooperate. " * 6)
    document.add_paragraph("Signed in Geneva.")
    document.save(str(path))
    return path


def test_headings_paragraphs_and_tables_in_order(tmp_path: Path) -> None:
    document = read_document(write_docx(tmp_path / "contract.docx"))

    assert document.kind == "docx"
    assert len(document.pages) == 1 and document.pages[0].label == "section 1"
    text = document.pages[0].text
    assert text.startswith("# Service agreement\n\nThis agreement starts on 1 May 2026.\n\n## Fees")
    assert "| Item | Fee |\n|---|---|\n| Support | 1200 EUR |\n| A\\|B | 5 |" in text
    assert "- Invoices are due within 30 days." in text
    assert text.index("## Fees") < text.index("| Item") < text.index("Signed in Geneva.")


def test_long_document_is_cut_into_numbered_sections(tmp_path: Path) -> None:
    document = read_document(write_docx(tmp_path / "long.docx", num_filler_paragraphs=80))

    assert len(document.pages) >= 5
    assert [page.number for page in document.pages] == list(range(1, len(document.pages) + 1))
    assert all(len(page.text) <= 3000 for page in document.pages)
    assert document.pages[-1].label == f"section {len(document.pages)}"
    assert document.pages[-1].text.endswith("Signed in Geneva.")
    # Cuts fall between paragraphs, never inside one.
    assert all(page.text.startswith(("Clause", "#")) for page in document.pages)
    assert f"[section {len(document.pages)}]" in document.as_prompt_text()


def test_zip_bomb_named_docx_is_refused_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "invoice.docx"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w") as member:
            zeros = bytes(1 << 20)
            for _ in range(64):  # 64 MiB of zeros deflate to ~64 KiB: a ratio near 1000
                member.write(zeros)
    assert path.stat().st_size < 1 << 20

    def no_inflating(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a zip member was decompressed")

    monkeypatch.setattr(zipfile.ZipExtFile, "read", no_inflating)
    with pytest.raises(DocumentError, match="would expand to 64 MiB") as caught:
        read_document(path)
    assert "not what a real document looks like" in caught.value.user_message


def test_archive_expanding_past_the_total_cap_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_docx(tmp_path / "big.docx")
    total = sum(info.file_size for info in zipfile.ZipFile(path).infolist())
    monkeypatch.setattr(sniff, "ZIP_TOTAL_LIMIT", total - 1)

    with pytest.raises(DocumentError, match="would expand to"):
        read_document(path)


def test_damaged_docx_is_a_clear_error(tmp_path: Path) -> None:
    path = write_docx(tmp_path / "broken.docx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DocumentError, match="damaged") as caught:
        read_document(path)
    assert "save it again" in caught.value.user_message


def test_docx_with_garbage_xml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", "<w:document><not closed")

    with pytest.raises(DocumentError, match="cannot be read as a Word document"):
        read_document(path)


def test_plain_zip_named_docx_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "photos.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("holiday/readme.txt", "pictures")

    with pytest.raises(UnsupportedFileError, match="zip archive"):
        read_document(path)


def test_docx_named_pdf_says_what_it_really_is(tmp_path: Path) -> None:
    path = write_docx(tmp_path / "contract.pdf")

    with pytest.raises(UnsupportedFileError, match="really a Word document"):
        read_document(path)


def test_password_protected_docx_asks_to_remove_the_password(tmp_path: Path) -> None:
    # Office wraps an encrypted .docx in an OLE2 compound file instead of a zip.
    path = tmp_path / "salaries.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(4096))

    with pytest.raises(DocumentError, match="protected by a password") as caught:
        read_document(path)
    assert "remove the password" in caught.value.user_message

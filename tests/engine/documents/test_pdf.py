"""PDF reading: text on known pages, scanned pages, damaged and protected files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.documents import image_token_cost, read_document, render_page_images
from engine.errors import DocumentError, UnsupportedFileError
from tests.engine.documents.builders import PAGE_TEXTS, write_pdf, write_scanned_pdf


def test_each_page_keeps_its_own_text(report_pdf: Path) -> None:
    document = read_document(report_pdf)

    assert document.kind == "pdf"
    assert [page.number for page in document.pages] == [1, 2, 3, 4]
    assert [page.label for page in document.pages] == ["p. 1", "p. 2", "p. 3", "p. 4"]
    for page, expected in zip(document.pages, PAGE_TEXTS):
        assert " ".join(page.text.split()) == expected
    assert document.scanned_pages == ()
    assert document.note == ""


def test_prompt_text_marks_every_page(report_pdf: Path) -> None:
    text = read_document(report_pdf).as_prompt_text()

    assert text.startswith('<document name="report.pdf" kind="pdf" pages="4">\n[p. 1]\n')
    assert text.endswith("</document>")
    positions = [text.index(f"[p. {n}]") for n in range(1, 5)]
    assert positions == sorted(positions)
    assert text.index("Net revenue rose") > positions[1]
    assert text.index("Net revenue rose") < positions[2]


def test_prompt_text_can_hold_chosen_pages_only(report_pdf: Path) -> None:
    text = read_document(report_pdf).as_prompt_text(numbers=[2, 4])

    assert "[p. 2]" in text and "[p. 4]" in text
    assert "[p. 1]" not in text and "Lyon" not in text


def test_line_end_hyphen_survives_as_a_hyphen(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "hyphen.pdf", ["A well-\nknown fact"])

    text = read_document(path).pages[0].text

    assert "\ufffe" not in text and "\x02" not in text
    assert "well-" in text and "known fact" in text


def test_scanned_page_is_reported_with_its_image_cost(tmp_path: Path) -> None:
    path = write_scanned_pdf(tmp_path / "scan.pdf", PAGE_TEXTS[:2], "INVOICE 4711")

    document = read_document(path)

    assert document.scanned_pages == (3,)
    assert document.pages[2].text == ""
    assert document.pages[0].text.strip()
    # An A4 page fit to 1540 px is 1089 x 1540: 39 x 55 patches plus one break per row.
    assert document.image_tokens == 39 * 55 + 55
    assert "Page 3 of scan.pdf has no text layer" in document.note
    assert "vision encoder" in document.note and "2,200 tokens" in document.note
    assert "[p. 3]\n(scanned page" in document.as_prompt_text()


def test_scanned_pages_render_to_images_of_the_announced_cost(tmp_path: Path) -> None:
    path = write_scanned_pdf(tmp_path / "scan.pdf", ["text page"], "INVOICE 4711")
    document = read_document(path)

    images = render_page_images(path, document.scanned_pages)

    assert len(images) == 1
    image = images[0]
    assert image.mode == "RGB" and max(image.size) == 1540
    assert image_token_cost(*image.size) == document.image_tokens
    # The drawn picture is there: the page is not blank white.
    assert image.convert("L").getextrema()[0] < 128


def test_rendering_a_missing_page_is_a_clear_error(report_pdf: Path) -> None:
    with pytest.raises(DocumentError, match="has no page 9"):
        render_page_images(report_pdf, [9])


def test_image_token_cost_shrinks_large_images_to_the_vision_limit() -> None:
    assert image_token_cost(28, 28) == 2
    assert image_token_cost(3080, 1540) == image_token_cost(1540, 770)
    assert image_token_cost(1540, 770) == 55 * 28 + 28
    assert image_token_cost(100, 57) == math.ceil(100 / 28) * 3 + 3


def test_encrypted_pdf_asks_for_an_unprotected_copy(make_pdf) -> None:
    path = make_pdf("secret.pdf", ["classified"], password="hunter2")

    with pytest.raises(DocumentError, match="protected by a password") as caught:
        read_document(path)
    assert "unprotected copy" in caught.value.user_message


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_pdf_is_a_clear_error(report_pdf: Path, damage: str) -> None:
    data = report_pdf.read_bytes()
    if damage == "truncated":
        report_pdf.write_bytes(data[: len(data) // 3])
    else:
        report_pdf.write_bytes(data[:9] + bytes((b * 7 + 13) % 256 for b in data[9:]))

    with pytest.raises(DocumentError, match="damaged") as caught:
        read_document(report_pdf)
    assert "save a new copy" in caught.value.user_message


def test_program_renamed_to_pdf_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "invoice.pdf"
    path.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00\x04\x00" + bytes(500))

    with pytest.raises(UnsupportedFileError, match="Windows program"):
        read_document(path)


def test_pdf_without_any_text_or_picture_is_refused(make_pdf) -> None:
    path = make_pdf("blank.pdf", ["", ""])

    with pytest.raises(DocumentError, match="contains no text"):
        read_document(path)

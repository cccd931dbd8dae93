"""PDF files through pypdfium2: text page by page, scanned pages rendered for the vision encoder."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from engine.documents.base import VISION_MAX_SIDE, Document, Page, Work, image_token_cost
from engine.errors import DocumentError

if TYPE_CHECKING:
    from PIL import Image

# pdfium marks a hyphen it found at a line end with U+FFFE (or 0x02 in bounded text).
_SOFT_HYPHENS = str.maketrans({"\ufffe": "-\n", "\x02": "-\n", "\x00": None})


def read_pdf(path: Path, work: Work) -> Document:
    """Extract the text of every page; pages without a text layer are listed as scanned."""
    with _open_pdf(path) as pdf:
        num_pages = len(pdf)
        pages: list[Page] = []
        scanned: list[int] = []
        broken: list[int] = []
        image_tokens = 0
        for index in range(num_pages):
            work.check()
            number = index + 1
            text, cost, is_broken = _read_page(pdf, index)
            if cost:
                scanned.append(number)
                image_tokens += cost
            if is_broken:
                broken.append(number)
            pages.append(Page(number, text, f"p. {number}"))
            work.report(number, num_pages)
    if not pages:
        raise DocumentError(f"{path.name} has no pages. Check that it is the document you meant.")
    note = _note(path, scanned, image_tokens, broken)
    return Document(path, "pdf", tuple(pages), note, tuple(scanned), image_tokens)


def render_page_images(
    path: str | Path, page_numbers: Iterable[int], max_side: int = VISION_MAX_SIDE
) -> list[Image.Image]:
    """Render pages (1-based numbers) to RGB images whose longest side is `max_side` pixels."""
    images = []
    with _open_pdf(Path(path)) as pdf:
        for number in page_numbers:
            if not 1 <= number <= len(pdf):
                raise DocumentError(f"{Path(path).name} has no page {number}.")
            page = pdf[number - 1]
            try:
                bitmap = page.render(scale=_render_scale(page.get_size(), max_side))
                images.append(bitmap.to_pil().convert("RGB"))
            finally:
                page.close()
    return images


@contextmanager
def _open_pdf(path: Path) -> Iterator[pdfium.PdfDocument]:
    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        raise _open_error(path, exc) from exc
    try:
        yield pdf
    finally:
        pdf.close()


def _open_error(path: Path, exc: pdfium.PdfiumError) -> DocumentError:
    code = getattr(exc, "err_code", None)
    if code == pdfium_c.FPDF_ERR_PASSWORD:
        return DocumentError(
            f"{path.name} is protected by a password. Open it in your PDF viewer, save or print "
            "an unprotected copy (Print > Save as PDF), and drop that copy."
        )
    if code == pdfium_c.FPDF_ERR_SECURITY:
        return DocumentError(
            f"{path.name} uses an encryption scheme Quire cannot open. Save an unprotected "
            "copy from your PDF viewer and drop that copy."
        )
    if code == pdfium_c.FPDF_ERR_FILE:
        return DocumentError(f"{path.name} cannot be opened. Check that you may read it.")
    return DocumentError(
        f"{path.name} is damaged and cannot be read as a PDF. If your PDF viewer opens it, "
        "save a new copy from there (Print > Save as PDF) and drop that copy."
    )


def _read_page(pdf: pdfium.PdfDocument, index: int) -> tuple[str, int, bool]:
    """Return (text, image-token cost if scanned else 0, whether the page was unreadable)."""
    try:
        page = pdf[index]
    except pdfium.PdfiumError:
        return "", 0, True
    try:
        textpage = page.get_textpage()
        try:
            text = _clean(textpage.get_text_range())
        finally:
            textpage.close()
        if text.strip() or not _has_content(page):
            return text, 0, False
        width, height = _rendered_size(page.get_size(), VISION_MAX_SIDE)
        return "", image_token_cost(width, height), False
    except pdfium.PdfiumError:
        return "", 0, True
    finally:
        page.close()


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_SOFT_HYPHENS)


def _has_content(page: pdfium.PdfPage) -> bool:
    return next(iter(page.get_objects(max_depth=1)), None) is not None


def _render_scale(size: tuple[float, float], max_side: int) -> float:
    # pdfium rounds the bitmap size up; aim a hair low so the longest side is exactly max_side.
    return (max_side - 0.01) / max(size[0], size[1], 1.0)


def _rendered_size(size: tuple[float, float], max_side: int) -> tuple[int, int]:
    scale = _render_scale(size, max_side)
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def _note(path: Path, scanned: list[int], image_tokens: int, broken: list[int]) -> str:
    parts = []
    if scanned:
        which = _page_list(scanned)
        each = image_tokens // len(scanned)
        parts.append(
            f"{which} of {path.name} {'has' if len(scanned) == 1 else 'have'} no text layer "
            f"(scanned). Quire will show {'it' if len(scanned) == 1 else 'them'} to the model as "
            f"images through its vision encoder: about {each:,} tokens per page, "
            f"{image_tokens:,} tokens in all."
        )
    if broken:
        verb = "is" if len(broken) == 1 else "are"
        parts.append(f"{_page_list(broken)} could not be read (damaged) and {verb} left empty.")
    return " ".join(parts)


def _page_list(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:20])
    more = f" and {len(numbers) - 20} more" if len(numbers) > 20 else ""
    return f"{'Page' if len(numbers) == 1 else 'Pages'} {shown}{more}"

"""read_document: sniff a dropped file, hand it to the reader for its format, check the result."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from engine.documents.base import VISION_MAX_SIDE, Document, IsCancelled, Progress, Work
from engine.documents.sniff import detect_kind
from engine.errors import DocumentError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from PIL import Image

# Readers are imported on first use: openpyxl, bs4 and python-docx cost ~1 s to import.
_READERS = {
    "pdf": ("pdf", "read_pdf"),
    "docx": ("word", "read_docx"),
    "xlsx": ("sheets", "read_xlsx"),
    "csv": ("sheets", "read_csv"),
    "html": ("html_page", "read_html"),
    "text": ("text", "read_text"),
    "markdown": ("text", "read_markdown"),
}


def read_document(
    path: str | Path,
    *,
    progress: Progress | None = None,
    is_cancelled: IsCancelled | None = None,
) -> Document:
    """Read a PDF, DOCX, XLSX, CSV, text, Markdown or HTML file into citable pages.

    Args:
        path: the file; its type is judged from its bytes, the extension only breaks ties.
        progress: called as progress(done, total) after each page (or sheet, section, or
            chunk of bytes for streamed text); monotone, ending at done == total.
        is_cancelled: polled before each page; when it returns True, reading stops.
    Returns:
        the Document, with pages numbered from 1.
    Raises:
        DocumentError: empty, damaged, password-protected, a zip bomb or absurdly large.
        UnsupportedFileError: not a type Quire reads.
        CancelledError: is_cancelled() returned True.
    """
    path = Path(path)
    work = Work(progress, is_cancelled)
    work.check()
    kind = detect_kind(path)
    module_name, function_name = _READERS[kind]
    module = importlib.import_module(f"engine.documents.{module_name}")
    document: Document = getattr(module, function_name)(path, work)
    if not document.scanned_pages and not any(page.text.strip() for page in document.pages):
        raise DocumentError(
            f"{path.name} contains no text to read. If it is a picture of text, drop it on "
            "the image area instead."
        )
    return document


def render_page_images(
    path: str | Path, page_numbers: Iterable[int], max_side: int = VISION_MAX_SIDE
) -> list[Image.Image]:
    """Render PDF pages (1-based numbers) to RGB images whose longest side is `max_side` px.

    Raises:
        DocumentError: the file cannot be opened or has no such page.
    """
    from engine.documents import pdf

    return pdf.render_page_images(path, page_numbers, max_side)

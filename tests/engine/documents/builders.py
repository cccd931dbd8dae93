"""Builders of real PDFs (with fpdf2) holding known text on known pages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fpdf import FPDF
from PIL import Image, ImageDraw

PAGE_TEXTS = (
    "The quarterly report opens with a summary of revenue.",
    "Net revenue rose by 12 percent compared with the previous year.",
    "Operating costs fell because the Lyon plant closed in March.",
    "The board proposes a dividend of 40 cents per share.",
)


def write_pdf(path: Path, texts: Sequence[str], password: str | None = None) -> Path:
    """A PDF with one page per text (Helvetica, wrapped), optionally password-protected."""
    pdf = FPDF()
    if password is not None:
        pdf.set_encryption(owner_password="owner-" + password, user_password=password)
    pdf.set_font("Helvetica", size=12)
    for text in texts:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))
    return path


def write_scanned_pdf(path: Path, text_pages: Sequence[str], image_text: str) -> Path:
    """A PDF whose text pages come first, then one page that is only a picture of text."""
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in text_pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    picture = Image.new("RGB", (800, 300), "white")
    ImageDraw.Draw(picture).text((40, 120), image_text, fill="black")
    pdf.add_page()
    pdf.image(picture, x=10, y=10, w=190)
    pdf.output(str(path))
    return path

"""Documents: turn a dropped file into text with page or section markers the model can cite."""

from __future__ import annotations

from engine.documents.base import Document, Page, image_token_cost
from engine.documents.reader import read_document, render_page_images

__all__ = ["Document", "Page", "image_token_cost", "read_document", "render_page_images"]

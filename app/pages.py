"""Fetches a cited page's text from the engine (ReadPage) for the page view."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Signal, Slot

from app.citations import Citation
from app.engine_client import EngineClient
from app.errors import describe_failure


def opens_as_pdf(citation: Citation) -> bool:
    return citation.document is not None and citation.document.suffix.lower() == ".pdf"


class PageController(QObject):
    """`fetch(citation)` -> `page_ready(citation, label, text)` or `failed(message)`."""

    page_ready = Signal(object, str, str)
    failed = Signal(str)

    def __init__(self, client: EngineClient, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.client = client
        self._pending: dict[str, Citation] = {}
        client.page_text.connect(self.on_client_page_text)
        client.failed.connect(self.on_client_failed)

    def problem(self, citation: Citation) -> str:
        """Why this citation's page cannot be shown ("" when it can)."""
        if citation.document is None:
            return f"No attached document has page {citation.page}."
        if not citation.document.is_file():
            return f"{citation.document} is no longer there; it was moved or deleted."
        return ""

    def fetch(self, citation: Citation) -> None:
        if citation.document is None:
            return
        request_id = self.client.read_page(citation.document, citation.page)
        self._pending[request_id] = citation

    @Slot(str, object)
    def on_client_page_text(self, request_id: str, event: Any) -> None:
        citation = self._pending.pop(request_id, None)
        if citation is not None:
            self.page_ready.emit(citation, event.label, event.text)

    @Slot(str, str, str)
    def on_client_failed(self, request_id: str, kind: str, user_message: str) -> None:
        if self._pending.pop(request_id, None) is not None:
            self.failed.emit(describe_failure(kind, user_message))

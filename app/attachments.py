"""Dropped files: check the type, ask the engine to read them, fill in their chips."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal, Slot

from app.engine_client import EngineClient
from app.errors import describe_failure
from app.state import Attachment, AttachmentList, attachment_kind

SUPPORTED_TEXT = "PDF, DOCX, TXT, MD, HTML, CSV, PNG, JPEG, WebP, TIFF or BMP"


class AttachmentController(QObject):
    """Turns paths into chips; unsupported or unreadable files produce `message`."""

    message = Signal(str)

    def __init__(
        self, client: EngineClient, attachments: AttachmentList, parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self.client, self.attachments = client, attachments
        self._pending: dict[str, Path] = {}
        client.document_read.connect(self.on_client_document_read)
        client.failed.connect(self.on_client_failed)

    def add_paths(self, paths: Iterable[Path]) -> int:
        """Add files; returns how many were accepted."""
        problems: list[str] = []
        num_added = 0
        for path in paths:
            problem = self._problem(path)
            if problem:
                problems.append(problem)
                continue
            size = path.stat().st_size
            self.attachments.add(Attachment(path, attachment_kind(path), num_bytes=size))
            self._pending[self.client.read_document(path)] = path
            num_added += 1
        if problems:
            self.message.emit("\n".join(problems))
        return num_added

    def _problem(self, path: Path) -> str:
        if not path.is_file():
            return f"{path.name}: not a readable file."
        if not attachment_kind(path):
            return f"{path.name}: this file type is not supported. Attach {SUPPORTED_TEXT}."
        if self.attachments.find(path) is not None:
            return f"{path.name} is already attached."
        return ""

    @Slot(str, object)
    def on_client_document_read(self, request_id: str, event: Any) -> None:
        path = self._pending.pop(request_id, None)
        item = self.attachments.find(path) if path else None
        if item is None:
            return
        item.num_pages, item.num_tokens = event.num_pages, event.num_tokens
        item.num_bytes, item.note, item.is_read = event.num_bytes, event.note, True
        self.attachments.changed.emit()

    @Slot(str, str, str)
    def on_client_failed(self, request_id: str, kind: str, user_message: str) -> None:
        path = self._pending.pop(request_id, None)
        item = self.attachments.find(path) if path else None
        if item is None:
            return
        item.error = describe_failure(kind, user_message)
        self.attachments.changed.emit()
        self.message.emit(f"{item.path.name}: {user_message}")

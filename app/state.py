"""Qt-free-of-widgets state: the open conversation, attachments, model status, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.citations import Citation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
DOCUMENT_SUFFIXES = (".pdf", ".docx", ".txt", ".md", ".markdown", ".html", ".htm", ".csv")


def attachment_kind(path: Path) -> str:
    """ "image", "document" or "" (unsupported), from the file name."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DOCUMENT_SUFFIXES:
        return "document"
    return ""


@dataclass
class Attachment:
    """A dropped file: what the chip shows, filled in as the engine reads it."""

    path: Path
    kind: str  # "document" | "image"
    num_bytes: int = 0
    num_pages: int = 0
    num_tokens: int = 0
    note: str = ""
    error: str = ""
    is_read: bool = False
    pages: str = ""  # which pages go to the model, e.g. "1-40"; "" = all

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "num_bytes": self.num_bytes,
            "num_pages": self.num_pages,
            "num_tokens": self.num_tokens,
            "note": self.note,
            "pages": self.pages,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attachment:
        return cls(
            Path(str(data.get("path", ""))),
            str(data.get("kind", "document")),
            int(data.get("num_bytes", 0)),
            int(data.get("num_pages", 0)),
            int(data.get("num_tokens", 0)),
            note=str(data.get("note", "")),
            is_read=True,
            pages=str(data.get("pages", "")),
        )


@dataclass
class Turn:
    """One message of the open conversation."""

    role: str  # "user" | "assistant"
    content: str = ""
    reasoning: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    effort: str = "none"
    status: str = "done"  # "streaming" | "done" | "stop" | "length" | "cancelled" | "error"
    stats: dict[str, float] = field(default_factory=dict)
    error: str = ""
    message_id: int = 0
    citations: list[Citation] = field(default_factory=list)

    @property
    def is_streaming(self) -> bool:
        return self.status == "streaming"


class ConversationState(QObject):
    """The conversation on screen. Widgets read it and follow its signals."""

    reset = Signal()
    turn_added = Signal(int)
    turn_changed = Signal(int)
    busy_changed = Signal(bool)
    effort_changed = Signal(str)
    error_shown = Signal(str)
    answer_finished = Signal(int)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.conversation_id = ""
        self.title = ""
        self.turns: list[Turn] = []
        self.effort = "none"
        self.is_busy = False

    def load(self, conversation_id: str, title: str, turns: list[Turn], effort: str) -> None:
        self.conversation_id, self.title, self.turns = conversation_id, title, turns
        self.set_effort(effort)
        self.reset.emit()

    def add_turn(self, turn: Turn) -> int:
        self.turns.append(turn)
        self.turn_added.emit(len(self.turns) - 1)
        return len(self.turns) - 1

    def truncate(self, index: int) -> None:
        del self.turns[index:]
        self.reset.emit()

    def set_busy(self, is_busy: bool) -> None:
        if is_busy != self.is_busy:
            self.is_busy = is_busy
            self.busy_changed.emit(is_busy)

    def set_effort(self, effort: str) -> None:
        if effort != self.effort:
            self.effort = effort
            self.effort_changed.emit(effort)


class AttachmentList(QObject):
    """Files waiting to go with the next message."""

    changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.items: list[Attachment] = []

    def add(self, item: Attachment) -> None:
        self.items.append(item)
        self.changed.emit()

    def remove(self, path: Path) -> None:
        self.items = [item for item in self.items if item.path != path]
        self.changed.emit()

    def find(self, path: Path) -> Attachment | None:
        return next((item for item in self.items if item.path == path), None)

    def take_all(self) -> list[Attachment]:
        items, self.items = self.items, []
        self.changed.emit()
        return items


class ModelStatus(QObject):
    """What the engine holds: state, plan, load progress, the loaded model, memory use."""

    state_changed = Signal(str)
    plan_changed = Signal(object)
    progress_changed = Signal(object)
    loaded_changed = Signal()
    load_failed = Signal(str)
    resources_changed = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = "unloaded"
        self.plan: Any = None
        self.loaded: Any = None  # the engine's ModelLoaded event, or None
        self.is_loading = False
        self.error = ""

    @property
    def is_loaded(self) -> bool:
        return self.loaded is not None

    @property
    def is_demo(self) -> bool:
        return bool(self.loaded is not None and self.loaded.is_demo)

    def set_state(self, state: str) -> None:
        self.state = state
        self.state_changed.emit(state)


class Metrics(QObject):
    """Numbers for the status bar: the last answer's stats and the context count."""

    stats_changed = Signal(object)
    context_changed = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.stats: Any = None
        self.context: Any = None

    def set_stats(self, stats: Any) -> None:
        self.stats = stats
        self.stats_changed.emit(stats)

    def set_context(self, count: Any) -> None:
        self.context = count
        self.context_changed.emit(count)

"""State objects: signals fire on change, attachments list, kinds of files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.state import (
    Attachment,
    AttachmentList,
    ConversationState,
    ModelStatus,
    Turn,
    attachment_kind,
)


def test_attachment_kind() -> None:
    assert attachment_kind(Path("a.PDF")) == "document"
    assert attachment_kind(Path("b.jpeg")) == "image"
    assert attachment_kind(Path("c.tiff")) == "image"
    assert attachment_kind(Path("d.exe")) == ""


def test_attachment_round_trip() -> None:
    item = Attachment(Path("/x/r.pdf"), "document", 10, 2, 300)
    again = Attachment.from_dict(item.to_dict())
    assert (again.path, again.num_pages, again.num_tokens, again.is_read) == (
        item.path,
        2,
        300,
        True,
    )


def test_conversation_signals(qtbot: Any) -> None:
    state = ConversationState()
    with qtbot.wait_signal(state.turn_added) as added:
        state.add_turn(Turn("user", "hi"))
    assert added.args == [0]
    with qtbot.assert_not_emitted(state.effort_changed):
        state.set_effort("none")
    with qtbot.wait_signal(state.busy_changed):
        state.set_busy(True)
    with qtbot.wait_signal(state.reset):
        state.truncate(0)
    assert state.turns == []


def test_attachment_list(qtbot: Any) -> None:
    items = AttachmentList()
    with qtbot.wait_signal(items.changed):
        items.add(Attachment(Path("a.txt"), "document"))
    assert items.find(Path("a.txt")) is not None
    assert [i.path for i in items.take_all()] == [Path("a.txt")]
    assert items.items == []


def test_model_status_flags() -> None:
    status = ModelStatus()
    assert not status.is_loaded and not status.is_demo and status.state == "unloaded"

"""Attachments (app/attachments.py): dropped files become chips, or inline messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.app.helpers import TIMEOUT_MS, drop, load, make_image, send


def make_files(tmp_path: Path) -> tuple[Path, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("Meeting notes\n" * 20)
    return text, make_image(tmp_path / "board.png")


def test_drop_text_and_image_on_window(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    window = make_window()
    text, image = make_files(tmp_path)
    drop(window, [text, image])
    chips = window.composer.chips
    qtbot.waitUntil(lambda: all(a.is_read for a in window.attachments.items), timeout=TIMEOUT_MS)
    assert [c.item.path.name for c in chips.chips] == ["notes.txt", "board.png"]
    assert "12 tokens" in chips.chips[0].name_label.text()
    assert not chips.chips[1].thumbnail.pixmap().isNull()
    assert chips.chips[1].thumbnail.pixmap().width() <= 36
    chips.chips[0].remove_button.click()
    assert [a.path.name for a in window.attachments.items] == ["board.png"]


def test_drop_on_composer_and_send_with_attachment(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    created: list[Any] = []
    window = make_window(created=created)
    load(qtbot, window)
    text, image = make_files(tmp_path)
    drop(window.composer.edit, [text])
    assert [a.path for a in window.attachments.items] == [text]
    send(qtbot, window, "what do the notes say?")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.conversation.turns) == 2,
        timeout=TIMEOUT_MS,
    )
    ask = next(r for r in created[0].submitted if type(r).__name__ == "Ask")
    assert ask.messages[-1].documents == (text,)
    assert window.attachments.items == []
    assert "notes.txt" in window.chat_view.views[0].attachments_label.text()


def test_unsupported_file_gets_an_inline_message(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    window = make_window()
    binary = tmp_path / "tool.exe"
    binary.write_bytes(b"MZ")
    drop(window, [binary])
    assert window.attachments.items == []
    assert window.composer.message_label.isVisible()
    assert "tool.exe: this file type is not supported" in window.composer.message_label.text()


def test_unreadable_file_marks_its_chip(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    from tests.app.fake_engine import Script

    script = Script(failures={"ReadDocument": ("DocumentError", "The PDF is encrypted.")})
    window = make_window(script=script)
    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(b"%PDF-1.7 locked")
    drop(window, [pdf])
    qtbot.waitUntil(lambda: bool(window.attachments.items[0].error), timeout=TIMEOUT_MS)
    assert window.composer.chips.chips[0].objectName() == "chipError"
    assert "The PDF is encrypted." in window.composer.message_label.text()

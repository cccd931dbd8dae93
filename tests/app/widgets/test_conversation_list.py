"""Conversations in the sidebar: rename, delete with undo, search, and a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from tests.app.helpers import TIMEOUT_MS, load, send


def titles(window: Any) -> list[str]:
    return [row.title for row in window.sidebar.model.rows]


def chat(qtbot: Any, window: Any, text: str) -> str:
    window.on_new_action_triggered()
    send(qtbot, window, text)
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.conversation.turns) == 2,
        timeout=TIMEOUT_MS,
    )
    return window.conversation.conversation_id


def test_rename_delete_undo_search(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    first = chat(qtbot, window, "Plan a trip to Lyon")
    second = chat(qtbot, window, "Summarise the budget")
    assert titles(window) == ["Summarise the budget", "Plan a trip to Lyon"]
    window.sidebar.rename_requested.emit(first, "Lyon trip")
    assert "Lyon trip" in titles(window)
    qtbot.keyClicks(window.sidebar.search, "lyon")
    assert titles(window) == ["Lyon trip"]
    window.sidebar.search.clear()
    qtbot.keyClicks(window.sidebar.search, "def add")  # matches message text, both chats
    assert len(titles(window)) == 2
    window.sidebar.search.clear()
    window.sidebar.delete(second)
    assert titles(window) == ["Lyon trip"]
    assert window.conversation.conversation_id == ""  # the open chat was deleted
    assert window.sidebar.undo_bar.isVisible()
    window.sidebar.undo_button.click()
    assert set(titles(window)) == {"Lyon trip", "Summarise the budget"}


def test_selecting_a_conversation_opens_it(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    first = chat(qtbot, window, "first question")
    chat(qtbot, window, "second question")
    row = window.sidebar.model.row_of(first)
    rect = window.sidebar.view.visualRect(window.sidebar.model.index(row))
    qtbot.mouseClick(window.sidebar.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert window.conversation.conversation_id == first
    assert window.chat_view.views[0].turn.content == "first question"


def test_history_survives_a_restart(qtbot: Any, make_window: Any, data_dir: Path) -> None:
    window = make_window()
    load(qtbot, window)
    cid = chat(qtbot, window, "remember me")
    window.close()
    again = make_window(directory=data_dir)
    assert titles(again) == ["remember me"]
    again.chat.open_conversation(cid)
    assert [t.content for t in again.conversation.turns][0] == "remember me"
    assert again.conversation.turns[1].content.startswith("Hello!")


def test_ctrl_n_and_ctrl_f(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    chat(qtbot, window, "something")
    window.activateWindow()
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert window.conversation.turns == [] and window.conversation.conversation_id == ""
    qtbot.keyClick(window, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: window.sidebar.search.hasFocus(), timeout=TIMEOUT_MS)


def test_answer_cut_by_a_crash_reopens_as_interrupted(
    qtbot: Any, make_window: Any, data_dir: Path
) -> None:
    window = make_window()
    cid = window.store.create_conversation("cut")
    window.store.add_message(cid, "user", "question")
    window.store.add_message(cid, "assistant", "half an ans", status="streaming")
    window.chat.open_conversation(cid)
    answer = window.chat_view.views[1]
    assert answer.turn.status == "interrupted"
    assert "Interrupted" in answer.note_label.text()
    qtbot.waitUntil(answer.regenerate_button.isVisible, timeout=TIMEOUT_MS)  # shown on next tick

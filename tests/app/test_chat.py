"""The chat flow (app/chat.py) through the real window, with the scripted fake engine."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt

from tests.app.fake_engine import ANSWER, REASONING, FakeEngine, Script
from tests.app.helpers import TIMEOUT_MS, load, send


def test_send_streams_tokens_into_the_chat(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    send(qtbot, window, "Hello there")
    qtbot.waitUntil(lambda: len(window.chat_view.views) == 2, timeout=TIMEOUT_MS)
    answer_view = window.chat_view.views[1]
    qtbot.waitUntil(lambda: 0 < len(answer_view.turn.content) < len(ANSWER), timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=TIMEOUT_MS)
    assert answer_view.answer_view.markdown == ANSWER
    assert "def add" in answer_view.answer_view.toPlainText()
    assert window.composer.text() == ""
    assert window.conversation.turns[0].content == "Hello there"


def test_shift_enter_adds_a_line_instead_of_sending(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    qtbot.keyClicks(window.composer.edit, "one")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(window.composer.edit, "two")
    assert window.composer.text() == "one\ntwo"
    assert window.conversation.turns == []


def test_escape_stops_mid_answer_and_keeps_partial_text(qtbot: Any, make_window: Any) -> None:
    window = make_window(script=Script(delay_s=0.02, chunk=1))
    load(qtbot, window)
    send(qtbot, window, "long answer please")
    qtbot.waitUntil(
        lambda: (
            len(window.conversation.turns) == 2 and len(window.conversation.turns[1].content) > 3
        ),
        timeout=TIMEOUT_MS,
    )
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=TIMEOUT_MS)
    answer = window.conversation.turns[1]
    assert answer.status == "cancelled"
    assert 0 < len(answer.content) < len(ANSWER)
    assert window.chat_view.views[1].note_label.text() == "Stopped."
    stored = window.store.messages(window.conversation.conversation_id)[1]
    assert stored.status == "cancelled" and stored.content == answer.content


def test_high_effort_shows_a_thinking_section(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    window.composer.effort_slider.setValue(1)
    assert window.conversation.effort == "high"
    send(qtbot, window, "think first")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.chat_view.views) == 2,
        timeout=TIMEOUT_MS,
    )
    view = window.chat_view.views[1]
    assert view.thinking_button.isVisible()
    assert view.reasoning_view.markdown == REASONING
    assert "reasoning: high" in view.header.text()
    assert not view.reasoning_view.isVisible()  # folded once the answer is done
    view.thinking_button.click()
    assert view.reasoning_view.isVisible()


def test_no_effort_means_no_thinking_section(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    send(qtbot, window, "quick")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.chat_view.views) == 2,
        timeout=TIMEOUT_MS,
    )
    view = window.chat_view.views[1]
    assert not view.thinking_button.isVisible()
    assert "reasoning: none" in view.header.text()


def test_effort_is_remembered_per_conversation(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    window.composer.effort_slider.setValue(1)
    send(qtbot, window, "first chat")
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=TIMEOUT_MS)
    first = window.conversation.conversation_id
    window.on_new_action_triggered()
    window.composer.effort_slider.setValue(0)
    send(qtbot, window, "second chat")
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=TIMEOUT_MS)
    window.chat.open_conversation(first)
    assert window.conversation.effort == "high"
    assert window.composer.effort_slider.value() == 1


def test_regenerate_replaces_the_last_answer(qtbot: Any, make_window: Any) -> None:
    created: list[FakeEngine] = []
    window = make_window(created=created)
    load(qtbot, window)
    send(qtbot, window, "again")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.chat_view.views) == 2,
        timeout=TIMEOUT_MS,
    )
    window.chat_view.views[1].regenerate_button.click()
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=TIMEOUT_MS)
    asks = [r for r in created[0].submitted if type(r).__name__ == "Ask"]
    assert len(asks) == 2
    assert len(window.store.messages(window.conversation.conversation_id)) == 2


def test_edit_and_resend_replaces_the_turn(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    send(qtbot, window, "orignal typo")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.chat_view.views) == 2,
        timeout=TIMEOUT_MS,
    )
    window.chat_view.views[0].edit_button.click()
    assert window.composer.text() == "orignal typo"
    window.composer.edit.setPlainText("original fixed")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.conversation.turns) == 2,
        timeout=TIMEOUT_MS,
    )
    contents = [m.content for m in window.store.messages(window.conversation.conversation_id)]
    assert contents == ["original fixed", ANSWER]


def test_asking_without_a_model_shows_the_engine_message(qtbot: Any, make_window: Any) -> None:
    script = Script(failures={"Ask": ("NoModelError", "No model is loaded yet.")})
    window = make_window(script=script)
    send(qtbot, window, "hello?")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.chat_view.views) == 2,
        timeout=TIMEOUT_MS,
    )
    error = window.chat_view.views[1].error_label
    assert error.isVisible()
    assert "No model is loaded yet." in error.text() and "model panel" in error.text()


def test_failing_load_shows_its_message(qtbot: Any, make_window: Any, tmp_path: Any) -> None:
    message = "/x has no config.json. Choose the folder that holds the model's files."
    window = make_window(script=Script(failures={"LoadModel": ("CheckpointError", message)}))
    window.load_model(tmp_path / "x")
    qtbot.waitUntil(lambda: not window.model_status.is_loading, timeout=TIMEOUT_MS)
    assert message in window.banner.label.text()
    assert window.banner.isVisible()
    assert message in window.model_panel.error_label.text()
    assert window.statusBar().state_label.text() == "No model"

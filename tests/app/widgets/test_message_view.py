"""One message: throttled streaming render, thinking fold, actions, copy."""

from __future__ import annotations

from typing import Any

from PySide6.QtGui import QGuiApplication

from app.state import Turn
from app.widgets.message_view import RENDER_INTERVAL_MS, MessageView, format_bytes, header_text


def test_streaming_text_renders_on_the_timer_not_per_token(qtbot: Any) -> None:
    turn = Turn("assistant", status="streaming")
    view = MessageView(turn)
    qtbot.add_widget(view)
    turn.content = "partial **answer**"
    view.set_turn(turn)
    assert view.answer_view.markdown == ""  # not yet: waits for the throttle timer
    qtbot.waitUntil(
        lambda: view.answer_view.markdown == turn.content, timeout=RENDER_INTERVAL_MS * 20
    )
    turn.content += " done"
    turn.status = "stop"
    view.set_turn(turn)
    assert view.answer_view.markdown == "partial **answer** done"  # final text: at once


def test_thinking_is_open_while_streaming_then_folded(qtbot: Any) -> None:
    turn = Turn("assistant", reasoning="step one", status="streaming", effort="high")
    view = MessageView(turn)
    qtbot.add_widget(view)
    view.show()
    view.refresh()
    assert view.reasoning_view.isVisible()
    turn.content, turn.status, turn.stats = "answer", "stop", {"seconds": 3.0}
    view.set_turn(turn)
    assert not view.reasoning_view.isVisible()
    assert view.thinking_button.text() == "Thought for 3 s"


def test_actions_per_role_and_copy(qtbot: Any) -> None:
    user = MessageView(Turn("user", "question"))
    answer = MessageView(Turn("assistant", "see\n\n```sh\nls -l\n```"))
    for view in (user, answer):
        qtbot.add_widget(view)
        view.show()
    assert user.edit_button.isVisible() and not user.regenerate_button.isVisible()
    assert answer.regenerate_button.isVisible() and not answer.edit_button.isVisible()
    answer.copy_code_button.click()
    assert QGuiApplication.clipboard().text() == "ls -l"
    answer.copy_button.click()
    assert QGuiApplication.clipboard().text().startswith("see")


def test_header_and_sizes() -> None:
    stats = {"decode_tps": 21.04, "ttft_s": 0.4}
    assert header_text(Turn("assistant", effort="high", stats=stats)) == (
        "Quire · reasoning: high · 21.0 tok/s · first token 0.40 s"
    )
    assert header_text(Turn("user")) == "You"
    assert format_bytes(512) == "512 B" and format_bytes(3 * 10**9) == "3.0 GB"
    assert format_bytes(24 * 2**30) == "25.8 GB"  # a 24 GiB card, in the plan's decimal units

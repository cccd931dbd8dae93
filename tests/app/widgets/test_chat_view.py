"""The scrolling conversation: follows the stream unless the user scrolled up."""

from __future__ import annotations

from typing import Any

from app.state import ConversationState, Turn
from app.widgets.chat_view import ChatView


def test_follows_stream_until_user_scrolls_up(qtbot: Any) -> None:
    state = ConversationState()
    view = ChatView(state)
    qtbot.add_widget(view)
    view.resize(500, 300)
    view.show()
    assert view.empty_label.isVisible()
    for i in range(6):
        state.add_turn(Turn("user", f"question {i}\n\n" + "line\n\n" * 5))
    bar = view.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0 and bar.value() == bar.maximum(), timeout=5000)
    assert not view.empty_label.isVisible()
    bar.setValue(0)  # the user scrolls up to read
    assert not view.is_following
    state.turns[-1].content += "more\n\n" * 10
    state.turn_changed.emit(len(state.turns) - 1)
    qtbot.wait(50)
    assert bar.value() == 0
    bar.setValue(bar.maximum())  # back to the bottom: following again
    assert view.is_following


def test_reset_rebuilds_views(qtbot: Any) -> None:
    state = ConversationState()
    view = ChatView(state)
    qtbot.add_widget(view)
    state.load("c1", "t", [Turn("user", "a"), Turn("assistant", "b")], "none")
    assert [v.turn.content for v in view.views] == ["a", "b"]
    state.load("", "", [], "none")
    assert view.views == [] and not view.empty_label.isHidden()

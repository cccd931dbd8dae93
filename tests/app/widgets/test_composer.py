"""The composer: keys, send/stop, effort slider, edit mode."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt

from app.state import AttachmentList, ConversationState
from app.widgets.composer import Composer


def make(qtbot: Any) -> tuple[Composer, ConversationState]:
    state = ConversationState()
    composer = Composer(state, AttachmentList())
    qtbot.add_widget(composer)
    composer.show()
    return composer, state


def test_enter_sends_and_escape_stops_only_when_busy(qtbot: Any) -> None:
    composer, state = make(qtbot)
    qtbot.keyClicks(composer.edit, "hi")
    with qtbot.wait_signal(composer.send_requested) as sent:
        qtbot.keyClick(composer.edit, Qt.Key.Key_Return)
    assert sent.args == ["hi"]
    with qtbot.assert_not_emitted(composer.stop_requested):
        qtbot.keyClick(composer.edit, Qt.Key.Key_Escape)
    state.set_busy(True)
    assert composer.stop_button.isVisible() and not composer.send_button.isVisible()
    with qtbot.assert_not_emitted(composer.send_requested):
        qtbot.keyClick(composer.edit, Qt.Key.Key_Return)
    with qtbot.wait_signal(composer.stop_requested):
        qtbot.keyClick(composer.edit, Qt.Key.Key_Escape)


def test_effort_slider_follows_state_and_emits(qtbot: Any) -> None:
    composer, state = make(qtbot)
    state.set_effort("high")
    assert composer.effort_slider.value() == 1 and "high" in composer.effort_label.text()
    with qtbot.wait_signal(composer.effort_selected) as chosen:
        composer.effort_slider.setValue(0)
    assert chosen.args == ["none"]
    assert composer.effort_slider.accessibleName() == "Reasoning effort"


def test_edit_mode_and_cancel(qtbot: Any) -> None:
    composer, _ = make(qtbot)
    composer.begin_edit(2, "old text")
    assert composer.editing_index == 2 and composer.edit_label.isVisible()
    with qtbot.wait_signal(composer.edit_cancelled):
        qtbot.keyClick(composer.edit, Qt.Key.Key_Escape)
    assert composer.editing_index == -1 and composer.text() == ""


def test_draft_changes_are_debounced(qtbot: Any) -> None:
    composer, _ = make(qtbot)
    with qtbot.wait_signal(composer.draft_changed, timeout=3000) as draft:
        qtbot.keyClicks(composer.edit, "abc")
    assert draft.args == ["abc"]

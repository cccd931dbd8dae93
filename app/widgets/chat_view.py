"""The conversation on screen: a scrolling column of messages that follows the stream."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtGui import QAccessible, QAccessibleAnnouncementEvent
from PySide6.QtWidgets import QLabel, QScrollArea, QVBoxLayout, QWidget

from app.state import ConversationState
from app.widgets.message_view import MessageView

FOLLOW_MARGIN_PX = 32  # "at the bottom" tolerance for auto-scroll

EMPTY_TEXT = (
    "<h2>Ask anything</h2><p>Type below and press Enter. Drop a PDF, a document or a photo "
    "anywhere on this window (or press Ctrl+O) to ask about it.</p>"
    "<p>Everything stays on this computer.</p>"
)


class ChatView(QScrollArea):
    """Views the `ConversationState`; re-emits message actions with the turn index."""

    regenerate_requested = Signal()
    edit_requested = Signal(int)
    citation_requested = Signal(object)  # a Citation whose page to open

    def __init__(self, state: ConversationState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setAccessibleName("Conversation")
        self._container = QWidget(self)
        self._container.setObjectName("chatContainer")
        self._layout = QVBoxLayout(self._container)
        self._layout.setContentsMargins(16, 16, 16, 16)
        self._layout.setSpacing(10)
        self.empty_label = QLabel(EMPTY_TEXT, self._container, wordWrap=True)
        self.empty_label.setObjectName("emptyState")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._layout.addWidget(self.empty_label)
        self._layout.addStretch(1)
        self.setWidget(self._container)
        self.views: list[MessageView] = []
        self.is_following = True
        bar = self.verticalScrollBar()
        bar.rangeChanged.connect(self.on_scrollbar_range_changed)
        bar.valueChanged.connect(self.on_scrollbar_value_changed)
        state.reset.connect(self.on_state_reset)
        state.turn_added.connect(self.on_state_turn_added)
        state.turn_changed.connect(self.on_state_turn_changed)
        state.answer_finished.connect(self.on_state_answer_finished)
        self.on_state_reset()

    @Slot()
    def on_state_reset(self) -> None:
        for view in self.views:
            self._layout.removeWidget(view)
            view.deleteLater()
        self.views = []
        for index in range(len(self.state.turns)):
            self.on_state_turn_added(index)
        self.empty_label.setVisible(not self.state.turns)
        self.is_following = True

    @Slot(int)
    def on_state_turn_added(self, index: int) -> None:
        view = MessageView(self.state.turns[index], self._container)
        view.regenerate_requested.connect(self.regenerate_requested)
        view.citation_requested.connect(self.citation_requested)
        view.edit_requested.connect(lambda i=index: self.edit_requested.emit(i))
        self._layout.insertWidget(self._layout.count() - 1, view)
        self.views.append(view)
        self.empty_label.hide()
        self._refresh_last_flags()
        self.is_following = True

    @Slot(int)
    def on_state_turn_changed(self, index: int) -> None:
        if 0 <= index < len(self.views):
            self.views[index].set_turn(self.state.turns[index], index == len(self.views) - 1)

    def _refresh_last_flags(self) -> None:
        last = len(self.views) - 1
        for index, view in enumerate(self.views):
            view.set_turn(self.state.turns[index], index == last)

    @Slot(int)
    def on_state_answer_finished(self, index: int) -> None:
        """Tell screen readers that the answer is complete."""
        if not 0 <= index < len(self.views):
            return
        view = self.views[index]
        event = QAccessibleAnnouncementEvent(view, "Answer ready: " + view.turn.content[:200])
        QAccessible.updateAccessibility(event)

    @Slot(int, int)
    def on_scrollbar_range_changed(self, _minimum: int, maximum: int) -> None:
        if self.is_following:
            self.verticalScrollBar().setValue(maximum)

    @Slot(int)
    def on_scrollbar_value_changed(self, value: int) -> None:
        self.is_following = value >= self.verticalScrollBar().maximum() - FOLLOW_MARGIN_PX

"""The composer: prompt box (Enter sends), send/stop, reasoning-effort slider, chips."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QDragEnterEvent, QDropEvent, QKeyEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from app.state import AttachmentList, ConversationState
from app.widgets.attachment_chips import AttachmentChips
from app.widgets.drop_zone import local_paths

EFFORTS = ("none", "high")
DRAFT_DEBOUNCE_MS = 400


class PromptEdit(QPlainTextEdit):
    """Enter sends, Shift+Enter breaks the line, Esc stops; dropped files become chips."""

    submitted = Signal()
    escape_pressed = Signal()
    files_dropped = Signal(list)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 (Qt override)
        key = event.key()
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            if not event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
                self.submitted.emit()
                return
        if key == Qt.Key.Key_Escape:
            self.escape_pressed.emit()
            return
        super().keyPressEvent(event)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 (Qt override)
        if local_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            super().dragEnterEvent(event)

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 (Qt override)
        paths = local_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.files_dropped.emit(paths)
        else:
            super().dropEvent(event)


class Composer(QFrame):
    """Views `ConversationState` (busy, effort) and `AttachmentList`; emits user intents."""

    send_requested = Signal(str)
    stop_requested = Signal()
    effort_selected = Signal(str)
    attach_requested = Signal()
    files_dropped = Signal(list)
    draft_changed = Signal(str)
    edit_cancelled = Signal()

    def __init__(
        self, state: ConversationState, attachments: AttachmentList, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.state = state
        self.setObjectName("composer")
        self.editing_index = -1
        self.edit = PromptEdit(self)
        self.edit.setPlaceholderText("Ask Quire…  (Enter sends, Shift+Enter adds a line)")
        self.edit.setAccessibleName("Message")
        self.edit.setTabChangesFocus(True)
        self.edit.setFixedHeight(84)
        self.chips = AttachmentChips(attachments, self)
        self.message_label = QLabel(self, wordWrap=True)
        self.message_label.setObjectName("composerMessage")
        self.message_label.hide()
        self._build_controls()
        self._layout_all()
        self._draft_timer = QTimer(self, singleShot=True, interval=DRAFT_DEBOUNCE_MS)
        self._draft_timer.timeout.connect(lambda: self.draft_changed.emit(self.text()))
        self.edit.textChanged.connect(self._draft_timer.start)
        self.edit.submitted.connect(self.on_edit_submitted)
        self.edit.escape_pressed.connect(self.on_edit_escape_pressed)
        self.edit.files_dropped.connect(self.files_dropped)
        state.busy_changed.connect(self.on_state_busy_changed)
        state.effort_changed.connect(self.on_state_effort_changed)
        self.on_state_busy_changed(state.is_busy)
        self.on_state_effort_changed(state.effort)

    def _build_controls(self) -> None:
        self.attach_button = QPushButton("Attach…", self)
        self.attach_button.setAccessibleName("Attach documents or images (Ctrl+O)")
        self.attach_button.clicked.connect(self.attach_requested)
        self.effort_slider = QSlider(Qt.Orientation.Horizontal, self)
        self.effort_slider.setRange(0, len(EFFORTS) - 1)
        self.effort_slider.setPageStep(1)
        self.effort_slider.setFixedWidth(60)
        self.effort_slider.setAccessibleName("Reasoning effort")
        self.effort_slider.valueChanged.connect(self.on_effort_slider_value_changed)
        self.effort_label = QLabel(self)
        self.effort_label.setBuddy(self.effort_slider)
        self.edit_label = QLabel("Editing an earlier message: Enter resends, Esc cancels.", self)
        self.edit_label.setObjectName("composerMessage")
        self.edit_label.hide()
        self.send_button = QPushButton("Send", self, default=True)
        self.send_button.setAccessibleName("Send message")
        self.send_button.clicked.connect(self.on_edit_submitted)
        self.stop_button = QPushButton("Stop", self)
        self.stop_button.setAccessibleName("Stop the answer (Esc)")
        self.stop_button.clicked.connect(self.stop_requested)

    def _layout_all(self) -> None:
        row = QHBoxLayout()
        row.addWidget(self.attach_button)
        row.addSpacing(12)
        row.addWidget(self.effort_label)
        row.addWidget(self.effort_slider)
        row.addStretch(1)
        row.addWidget(self.stop_button)
        row.addWidget(self.send_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 8)
        layout.addWidget(self.chips)
        layout.addWidget(self.message_label)
        layout.addWidget(self.edit_label)
        layout.addWidget(self.edit)
        layout.addLayout(row)

    # ------------------------------------------------------------------ API
    def text(self) -> str:
        return self.edit.toPlainText()

    def show_message(self, text: str) -> None:
        """An inline note above the prompt (unsupported file, nothing to send...)."""
        self.message_label.setText(text)
        self.message_label.setVisible(bool(text))

    def begin_edit(self, index: int, text: str) -> None:
        self.editing_index = index
        self.edit.setPlainText(text)
        self.edit_label.show()
        self.edit.setFocus()

    def end_edit(self) -> None:
        self.editing_index = -1
        self.edit_label.hide()

    # ------------------------------------------------------------------ slots
    @Slot()
    def on_edit_submitted(self) -> None:
        if self.state.is_busy:
            return
        self.show_message("")
        self.send_requested.emit(self.text())

    @Slot()
    def on_edit_escape_pressed(self) -> None:
        if self.state.is_busy:
            self.stop_requested.emit()
        elif self.editing_index >= 0:
            self.end_edit()
            self.edit.clear()
            self.edit_cancelled.emit()

    @Slot(bool)
    def on_state_busy_changed(self, is_busy: bool) -> None:
        self.stop_button.setVisible(is_busy)
        self.send_button.setVisible(not is_busy)

    @Slot(str)
    def on_state_effort_changed(self, effort: str) -> None:
        index = EFFORTS.index(effort) if effort in EFFORTS else 0
        self.effort_slider.blockSignals(True)
        self.effort_slider.setValue(index)
        self.effort_slider.blockSignals(False)
        self.effort_label.setText(f"Reasoning: <b>{EFFORTS[index]}</b>")

    @Slot(int)
    def on_effort_slider_value_changed(self, value: int) -> None:
        self.effort_label.setText(f"Reasoning: <b>{EFFORTS[value]}</b>")
        self.effort_selected.emit(EFFORTS[value])


def paths_of(values: list[object]) -> list[Path]:
    return [Path(str(value)) for value in values]

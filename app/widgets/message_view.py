"""One message: header, collapsible thinking, rendered answer, attachments, actions."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.state import Turn
from app.widgets.citation_chips import CitationChips
from app.widgets.markdown_view import MarkdownView, code_blocks

RENDER_INTERVAL_MS = 80  # re-render streamed markdown at most ~12 times a second

_STATUS_NOTES = {
    "cancelled": "Stopped.",
    "length": "Stopped at the answer-length limit (Settings > Max tokens).",
    "interrupted": "Interrupted: Quire closed while writing. Regenerate to finish it.",
}


def format_bytes(num_bytes: float) -> str:
    """Decimal units (1 GB = 10^9 bytes), as the engine's plan sentences count them: the memory
    line and the plan beside it must not disagree by 7%."""
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def header_text(turn: Turn) -> str:
    if turn.role == "user":
        return "You"
    parts = ["Quire", f"reasoning: {turn.effort}"]
    if turn.is_streaming:
        parts.append("writing…")
    stats = turn.stats
    if stats:
        parts.append(f"{stats.get('decode_tps', 0):.1f} tok/s")
        parts.append(f"first token {stats.get('ttft_s', 0):.2f} s")
    return " · ".join(parts)


class MessageView(QFrame):
    """Shows one `Turn`; streamed text is re-rendered on a timer, not per token."""

    regenerate_requested = Signal()
    edit_requested = Signal()
    citation_requested = Signal(object)  # a Citation whose page to open

    def __init__(self, turn: Turn, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.turn = turn
        self.setObjectName("userMessage" if turn.role == "user" else "assistantMessage")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self._render_timer = QTimer(self, singleShot=True, interval=RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self.refresh)
        self.header = QLabel(self)
        self.header.setObjectName("messageHeader")
        self.thinking_button = QToolButton(self)
        self.thinking_button.setCheckable(True)
        self.thinking_button.setText("Thinking")
        self.thinking_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.thinking_button.setArrowType(Qt.ArrowType.DownArrow)
        self.thinking_button.setAccessibleName("Show or hide the model's reasoning")
        self.thinking_button.toggled.connect(self.on_thinking_button_toggled)
        self.reasoning_view = MarkdownView(self)
        self.reasoning_view.setObjectName("reasoning")
        self.reasoning_view.setAccessibleName("Reasoning")
        self.answer_view = MarkdownView(self)
        self.answer_view.setAccessibleName("Your message" if turn.role == "user" else "Answer")
        self.attachments_label = QLabel(self, wordWrap=True)
        self.citation_chips = CitationChips(self)
        self.citation_chips.open_requested.connect(self.citation_requested)
        self.note_label = QLabel(self, wordWrap=True)
        self.note_label.setObjectName("noteLabel")
        self.error_label = QLabel(self, wordWrap=True)
        self.error_label.setObjectName("errorLabel")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._build_layout(self._build_actions())
        self._thinking_user_choice: bool | None = None
        self._is_last = True
        self.refresh()

    def _build_actions(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.copy_button = QPushButton("Copy", self, flat=True)
        self.copy_button.setAccessibleName("Copy message")
        self.copy_button.clicked.connect(self.on_copy_button_clicked)
        self.copy_code_button = QPushButton("Copy code", self, flat=True)
        self.copy_code_button.setAccessibleName("Copy the code blocks of this message")
        self.copy_code_button.clicked.connect(self.on_copy_code_button_clicked)
        self.regenerate_button = QPushButton("Regenerate", self, flat=True)
        self.regenerate_button.setAccessibleName("Regenerate this answer")
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        self.edit_button = QPushButton("Edit", self, flat=True)
        self.edit_button.setAccessibleName("Edit and resend this message")
        self.edit_button.clicked.connect(self.edit_requested)
        for button in (
            self.copy_button,
            self.copy_code_button,
            self.regenerate_button,
            self.edit_button,
        ):
            row.addWidget(button)
        row.addStretch(1)
        return row

    def _build_layout(self, actions: QHBoxLayout) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 6)
        layout.setSpacing(4)
        for widget in (
            self.header,
            self.attachments_label,
            self.thinking_button,
            self.reasoning_view,
            self.answer_view,
            self.citation_chips,
            self.note_label,
            self.error_label,
        ):
            layout.addWidget(widget)
        layout.addLayout(actions)

    # ------------------------------------------------------------------ updates
    def set_turn(self, turn: Turn, is_last: bool = True) -> None:
        """Show `turn`; while it streams, rendering waits for the throttle timer."""
        self.turn = turn
        self._is_last = is_last
        if turn.is_streaming:
            if not self._render_timer.isActive():
                self._render_timer.start()
        else:
            self._render_timer.stop()
            self.refresh()

    @Slot()
    def refresh(self) -> None:
        turn = self.turn
        self.header.setText(header_text(turn))
        has_reasoning = bool(turn.reasoning)
        self.thinking_button.setVisible(has_reasoning)
        if has_reasoning:
            # Open while it streams, folded once the answer is done, unless the user chose.
            is_open = self._thinking_user_choice
            if is_open is None:
                is_open = turn.is_streaming and not turn.content
            self.thinking_button.blockSignals(True)
            self.thinking_button.setChecked(is_open)
            self.thinking_button.blockSignals(False)
            self._show_reasoning(is_open)
            self.reasoning_view.set_markdown(turn.reasoning)
        else:
            self.reasoning_view.hide()
        self.answer_view.set_markdown(turn.content)
        self.answer_view.setVisible(bool(turn.content) or turn.role == "user")
        self._render_extras(turn)

    def _render_extras(self, turn: Turn) -> None:
        # Plain text, not an emoji: many office machines have no emoji font (it drew as a box).
        names = [
            f"{a.path.name} ({format_bytes(a.num_bytes)}"
            + (f", pages {a.pages})" if a.pages else ")")
            for a in turn.attachments
        ]
        self.citation_chips.set_citations(turn.citations)
        self.attachments_label.setText(("Attached: " + " · ".join(names)) if names else "")
        self.attachments_label.setVisible(bool(names))
        note = _STATUS_NOTES.get(turn.status, "")
        self.note_label.setText(note)
        self.note_label.setVisible(bool(note))
        self.error_label.setText(turn.error)
        self.error_label.setVisible(bool(turn.error))
        self.copy_code_button.setVisible(bool(code_blocks(turn.content)))
        self.edit_button.setVisible(turn.role == "user")
        self.regenerate_button.setVisible(
            turn.role == "assistant" and self._is_last and not turn.is_streaming
        )
        self.copy_button.setEnabled(not turn.is_streaming)

    def _show_reasoning(self, is_open: bool) -> None:
        self.reasoning_view.setVisible(is_open)
        arrow = Qt.ArrowType.DownArrow if is_open else Qt.ArrowType.RightArrow
        self.thinking_button.setArrowType(arrow)
        seconds = self.turn.stats.get("seconds") if self.turn.stats else None
        label = "Thinking" if seconds is None else f"Thought for {seconds:.0f} s"
        self.thinking_button.setText(label)

    @Slot(bool)
    def on_thinking_button_toggled(self, checked: bool) -> None:
        self._thinking_user_choice = checked
        self._show_reasoning(checked)

    @Slot()
    def on_copy_button_clicked(self) -> None:
        QGuiApplication.clipboard().setText(self.turn.content)

    @Slot()
    def on_copy_code_button_clicked(self) -> None:
        QGuiApplication.clipboard().setText("\n\n".join(code_blocks(self.turn.content)))

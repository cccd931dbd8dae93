"""Shown when a message does not fit the context: choose pages per document or drop files,
watch the live total, and send only once it fits."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from PySide6.QtCore import QRegularExpression, QTimer, Signal, Slot
from PySide6.QtGui import QRegularExpressionValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QGridLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from app.state import Attachment

RECOUNT_DELAY_MS = 250  # wait for the user to stop typing before asking the engine again
PAGES_PATTERN = r"^\s*(\d+(\s*-\s*\d+)?)(\s*,\s*\d+(\s*-\s*\d+)?)*\s*,?\s*$"


def _item_indices(parts: list[Any], name: str) -> list[int]:
    """Where one pending file sits in `parts`: its last "document NAME" or "image NAME" part
    (the pending message comes last; earlier turns may hold a file of the same name) and the
    scanned pages read as images right after it."""
    heads = [i for i, p in enumerate(parts) if p.label in (f"document {name}", f"image {name}")]
    if not heads:
        return []
    indices = [heads[-1]]
    while indices[-1] + 1 < len(parts) and parts[indices[-1] + 1].label.startswith(
        f"image {name} p. "
    ):
        indices.append(indices[-1] + 1)
    return indices


def item_tokens(count: Any, item: Attachment) -> int:
    """What one pending file costs in `count`: its text plus any scanned pages as images."""
    parts = list(count.parts)
    return sum(parts[i].num_tokens for i in _item_indices(parts, item.path.name))


def other_parts(count: Any, items: list[Attachment]) -> list[tuple[str, int]]:
    """The parts of `count` that no row controls (prompt, earlier documents, history...)."""
    parts = list(count.parts)
    taken = {i for item in items for i in _item_indices(parts, item.path.name)}
    return [(p.label, p.num_tokens) for i, p in enumerate(parts) if i not in taken]


class BudgetRow:
    """One file: include it or not, its pages (documents only), its token count."""

    def __init__(self, item: Attachment, parent: QWidget) -> None:
        self.item = item
        self.include = QCheckBox(item.path.name, parent)
        self.include.setChecked(True)
        self.include.setAccessibleName(f"Include {item.path.name}")
        self.pages = QLineEdit(item.pages, parent)
        self.pages.setAccessibleName(f"Pages of {item.path.name} to include")
        self.pages.setValidator(QRegularExpressionValidator(QRegularExpression(PAGES_PATTERN)))
        if item.kind == "document":
            total = f"of {item.num_pages}" if item.num_pages else ""
            self.pages.setPlaceholderText(f"all pages {total}".strip())
        else:
            self.pages.setPlaceholderText("image")
            self.pages.setEnabled(False)
        self.tokens = QLabel(parent)

    def chosen(self) -> Attachment | None:
        if not self.include.isChecked():
            return None
        pages = re.sub(r"\s+", "", self.pages.text()).strip(",")
        return replace(self.item, pages=pages if self.item.kind == "document" else "")


class BudgetDialog(QDialog):
    """Rows of files with pages and tokens; `recount_requested(list[Attachment])` asks for a
    new count, which comes back through `set_count` (or `set_error`)."""

    recount_requested = Signal(object)

    def __init__(self, items: list[Attachment], count: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Too long for the model's context")
        self._recount_timer = QTimer(self, singleShot=True, interval=RECOUNT_DELAY_MS)
        self._recount_timer.timeout.connect(self.on_recount_timer_timeout)
        self.intro = QLabel(self, wordWrap=True)
        self.rows = [BudgetRow(item, self) for item in items]
        self.others_label = QLabel(self, wordWrap=True)
        self.others_label.setObjectName("noteLabel")
        self.total_label = QLabel(self, wordWrap=True)
        self.total_label.setAccessibleName("Total tokens")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel, self)
        self.send_button = self.buttons.addButton("Send", QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self._build_layout()
        for row in self.rows:
            row.include.toggled.connect(self.on_row_edited)
            row.pages.textEdited.connect(self.on_row_edited)
        self.count: Any = None
        self.set_count(count)

    def _build_layout(self) -> None:
        grid = QGridLayout()
        for column, title in enumerate(("File", "Pages", "Tokens")):
            grid.addWidget(QLabel(f"<b>{title}</b>", self), 0, column)
        for index, row in enumerate(self.rows, start=1):
            grid.addWidget(row.include, index, 0)
            grid.addWidget(row.pages, index, 1)
            grid.addWidget(row.tokens, index, 2)
        layout = QVBoxLayout(self)
        layout.addWidget(self.intro)
        layout.addLayout(grid)
        layout.addWidget(self.others_label)
        layout.addWidget(self.total_label)
        layout.addWidget(self.buttons)
        self.setMinimumWidth(600)

    def chosen_items(self) -> list[Attachment]:
        return [item for row in self.rows if (item := row.chosen()) is not None]

    # ------------------------------------------------------------------ counts
    def set_count(self, count: Any) -> None:
        """Show a count (the engine's TokenCount for the current choice)."""
        self.count = count
        limit = count.context_length
        self.intro.setText(
            f"This message needs {count.total:,} tokens but the model's context holds "
            f"{limit:,}. Choose the pages to include (for example 1-40, 52) or leave files "
            "out. Nothing is cut without you choosing it."
        )
        for row in self.rows:
            tokens = item_tokens(count, row.item) if row.include.isChecked() else 0
            row.tokens.setText(f"{tokens:,}")
        others = other_parts(count, [r.item for r in self.rows])
        text = "Also in the context: " + " · ".join(f"{label}: {n:,}" for label, n in others)
        if any(label.startswith(("document ", "image ")) for label, _ in others):
            text += ". Files of earlier messages stay in this chat; start a new chat to drop them."
        self.others_label.setText(text)
        verdict = "fits" if count.fits else f"{count.total - limit:,} too many"
        self.total_label.setText(f"<b>Total: {count.total:,} of {limit:,} tokens</b> ({verdict})")
        self.total_label.setObjectName("" if count.fits else "errorLabel")
        self._refresh_style(self.total_label)
        self.send_button.setEnabled(bool(count.fits) and not self._recount_timer.isActive())

    def set_error(self, message: str) -> None:
        self.total_label.setText(message)
        self.total_label.setObjectName("errorLabel")
        self._refresh_style(self.total_label)
        self.send_button.setEnabled(False)

    @staticmethod
    def _refresh_style(widget: QWidget) -> None:
        widget.style().unpolish(widget)
        widget.style().polish(widget)

    @Slot()
    def on_row_edited(self) -> None:
        self.send_button.setEnabled(False)  # the shown count is for the old choice
        self.total_label.setText("Counting…")
        self._recount_timer.start()

    @Slot()
    def on_recount_timer_timeout(self) -> None:
        if not all(row.pages.hasAcceptableInput() or not row.pages.text() for row in self.rows):
            self.set_error("Write pages like 1-40, 52.")
            return
        self.recount_requested.emit(self.chosen_items())

"""Small dialogs: the shortcuts sheet and the crash report."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

SHORTCUTS = (
    ("Enter", "Send the message"),
    ("Shift+Enter", "New line in the message"),
    ("Esc", "Stop the answer (or cancel an edit)"),
    ("Ctrl+N", "New chat"),
    ("Ctrl+F", "Search conversations"),
    ("Ctrl+O", "Attach documents or images"),
    ("Ctrl+M", "Show or hide the model panel"),
    ("Ctrl+,", "Settings"),
    ("Ctrl+E", "Export the conversation as Markdown"),
    ("F2 / Delete", "Rename / delete the selected conversation"),
    ("Ctrl+/", "This list"),
)


class ShortcutsDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        table = QTableWidget(len(SHORTCUTS), 2, self)
        table.setHorizontalHeaderLabels(["Keys", "Action"])
        table.setAccessibleName("Keyboard shortcuts")
        for row, (keys, action) in enumerate(SHORTCUTS):
            table.setItem(row, 0, QTableWidgetItem(keys))
            table.setItem(row, 1, QTableWidgetItem(action))
        table.resizeColumnsToContents()
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().hide()
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(table)
        layout.addWidget(buttons)
        self.resize(460, 420)


class CrashDialog(QDialog):
    """Shown for bugs: what happened, that the history is safe, and the details to report."""

    def __init__(self, details: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Quire hit a bug")
        label = QLabel(
            "Something went wrong inside Quire. Your conversations are saved. "
            "You can keep working; if this repeats, send the details below "
            "to your administrator.",
            self,
        )
        label.setWordWrap(True)
        text = QPlainTextEdit(details, self, readOnly=True)
        text.setAccessibleName("Error details")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(label)
        layout.addWidget(text)
        layout.addWidget(buttons)
        self.resize(640, 400)

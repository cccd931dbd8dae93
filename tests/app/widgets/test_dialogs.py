"""The shortcuts sheet and the crash dialog."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QPlainTextEdit, QTableWidget

from app.widgets.dialogs import SHORTCUTS, CrashDialog, ShortcutsDialog


def test_shortcuts_sheet_lists_every_shortcut(qtbot: Any) -> None:
    dialog = ShortcutsDialog()
    qtbot.add_widget(dialog)
    table = dialog.findChild(QTableWidget)
    assert table.rowCount() == len(SHORTCUTS)
    keys = {table.item(row, 0).text() for row in range(table.rowCount())}
    assert {"Enter", "Shift+Enter", "Esc", "Ctrl+N", "Ctrl+F", "Ctrl+O"} <= keys


def test_crash_dialog_shows_details(qtbot: Any) -> None:
    dialog = CrashDialog("Traceback: boom")
    qtbot.add_widget(dialog)
    assert dialog.findChild(QPlainTextEdit).toPlainText() == "Traceback: boom"

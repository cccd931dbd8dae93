"""Helpers shared by the GUI tests: load, send, drop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QColor, QDragEnterEvent, QDropEvent, QImage
from PySide6.QtWidgets import QApplication, QWidget

TIMEOUT_MS = 10_000


def load(qtbot: Any, window: Any) -> None:
    window.load_demo()
    qtbot.waitUntil(
        lambda: window.model_status.is_loaded and not window.model_status.is_loading,
        timeout=TIMEOUT_MS,
    )


def send(qtbot: Any, window: Any, text: str) -> None:
    window.composer.edit.setFocus()
    qtbot.keyClicks(window.composer.edit, text)
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)


def wait_answer(qtbot: Any, window: Any, num_turns: int = 2, timeout: int = TIMEOUT_MS) -> None:
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.conversation.turns) == num_turns,
        timeout=timeout,
    )


def drop(target: QWidget, paths: list[Path]) -> None:
    """Simulate dragging `paths` onto `target` and releasing the mouse."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    pos = QPointF(QPoint(target.width() // 2, target.height() // 2))
    actions = Qt.DropAction.CopyAction
    enter = QDragEnterEvent(
        pos, actions, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    QApplication.sendEvent(target, enter)
    assert enter.isAccepted()
    event = QDropEvent(
        pos, actions, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    QApplication.sendEvent(target, event)


def make_image(path: Path, width: int = 200, height: int = 120) -> Path:
    picture = QImage(width, height, QImage.Format.Format_RGB32)
    picture.fill(QColor("teal"))
    assert picture.save(str(path))
    return path


def make_pdf(path: Path, pages: list[str]) -> Path:
    """A real PDF (fpdf2) with one page per string, each with a text layer."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=14)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path

"""Drop helpers: local paths from mime data; the overlay while dragging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QMimeData, QUrl
from PySide6.QtWidgets import QWidget

from app.widgets.drop_zone import DropOverlay, local_paths


def test_local_paths_ignore_remote_urls() -> None:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile("/tmp/a.pdf"), QUrl("https://example.org/b.pdf")])
    assert local_paths(mime) == [Path("/tmp/a.pdf")]
    text_only = QMimeData()
    text_only.setText("just text")
    assert local_paths(text_only) == []


def test_overlay_covers_its_window(qtbot: Any) -> None:
    window = QWidget()
    qtbot.add_widget(window)
    window.resize(300, 200)
    overlay = DropOverlay(window)
    window.show()
    assert overlay.isHidden()
    overlay.show_over(window)
    assert overlay.isVisible() and overlay.geometry() == window.rect()

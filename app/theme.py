"""Light and dark palettes (following the system by default), font size, stylesheet."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QPalette
from PySide6.QtWidgets import QApplication

log = logging.getLogger(__name__)


def _resources_dir() -> Path:
    """resources/ beside app/ in a checkout; share/quire/resources in an installed wheel."""
    for candidate in (Path(__file__).resolve().parent.parent / "resources",
                      Path(sys.prefix) / "share" / "quire" / "resources"):
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parent.parent / "resources"


RESOURCES = _resources_dir()

_DARK = {
    QPalette.ColorRole.Window: "#1f2124",
    QPalette.ColorRole.WindowText: "#e6e6e6",
    QPalette.ColorRole.Base: "#26282c",
    QPalette.ColorRole.AlternateBase: "#2c2f33",
    QPalette.ColorRole.Text: "#e6e6e6",
    QPalette.ColorRole.Button: "#2f3237",
    QPalette.ColorRole.ButtonText: "#e6e6e6",
    QPalette.ColorRole.Highlight: "#3d7bd9",
    QPalette.ColorRole.HighlightedText: "#ffffff",
    QPalette.ColorRole.ToolTipBase: "#2f3237",
    QPalette.ColorRole.ToolTipText: "#e6e6e6",
    QPalette.ColorRole.PlaceholderText: "#8a8d91",
    QPalette.ColorRole.Link: "#7fb0ff",
}


_DIMMED_WHEN_DISABLED = (
    QPalette.ColorRole.Text,
    QPalette.ColorRole.ButtonText,
    QPalette.ColorRole.WindowText,
)


def wants_dark(theme: str) -> bool:
    if theme in ("light", "dark"):
        return theme == "dark"
    return QGuiApplication.styleHints().colorScheme() == Qt.ColorScheme.Dark


def stylesheet(dark: bool) -> str:
    """base.qss + light.qss or dark.qss; empty (plain Fusion) when resources/ is missing."""
    try:
        base = (RESOURCES / "base.qss").read_text(encoding="utf-8")
        return base + (RESOURCES / ("dark.qss" if dark else "light.qss")).read_text("utf-8")
    except OSError as exc:  # e.g. a wheel built without resources/: still usable
        log.warning("stylesheet not found, using plain colours: %s", exc)
        return ""


def app_icon() -> QIcon:
    return QIcon(str(RESOURCES / "quire.svg"))


def apply_theme(app: QApplication, theme: str, font_size: int) -> None:
    """Set the Fusion style, the palette for `theme`, the font size and the stylesheet."""
    app.setStyle("Fusion")
    dark = wants_dark(theme)
    palette = app.style().standardPalette()
    if dark:
        for role, colour in _DARK.items():
            palette.setColor(role, QColor(colour))
        for role in _DIMMED_WHEN_DISABLED:  # setColor(role) set every group: dim disabled ones
            palette.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6b6e72"))
    app.setPalette(palette)
    font = app.font()
    font.setPointSize(font_size)
    app.setFont(font)
    app.setStyleSheet(stylesheet(dark))

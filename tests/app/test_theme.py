"""Themes: explicit light/dark palettes, font size, stylesheet from resources/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication

from app.theme import apply_theme, stylesheet, wants_dark


@pytest.fixture
def restore_look(qapp: QApplication) -> Iterator[QApplication]:
    palette, font, sheet = qapp.palette(), qapp.font(), qapp.styleSheet()
    yield qapp
    qapp.setPalette(palette)
    qapp.setFont(font)
    qapp.setStyleSheet(sheet)


def test_dark_and_light(restore_look: QApplication) -> None:
    apply_theme(restore_look, "dark", 13)
    assert restore_look.palette().color(QPalette.ColorRole.Base).lightness() < 128
    assert restore_look.font().pointSize() == 13
    assert "#263449" in restore_look.styleSheet()
    apply_theme(restore_look, "light", 11)
    assert restore_look.palette().color(QPalette.ColorRole.Base).lightness() > 128


def test_wants_dark_and_stylesheets() -> None:
    assert wants_dark("dark") and not wants_dark("light")
    assert isinstance(wants_dark("system"), bool)
    assert "QFrame#userMessage" in stylesheet(False)


def test_missing_resources_fall_back_to_plain_colours(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    import app.theme

    monkeypatch.setattr(app.theme, "RESOURCES", tmp_path)
    assert stylesheet(True) == ""


def test_icon_loads() -> None:
    from app.theme import app_icon

    assert not app_icon().isNull()


def test_dark_disabled_text_is_dimmed(restore_look: QApplication) -> None:
    apply_theme(restore_look, "dark", 11)
    palette = restore_look.palette()
    enabled = palette.color(QPalette.ColorGroup.Active, QPalette.ColorRole.ButtonText)
    disabled = palette.color(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText)
    assert disabled.lightness() < enabled.lightness() - 60

"""The settings dialog edits a copy of the settings; the privacy tab reads the guard."""

from __future__ import annotations

from typing import Any

from app.privacy import NetworkGuard
from app.settings import Settings
from app.widgets.settings_dialog import SettingsDialog


def test_result_settings(qtbot: Any) -> None:
    dialog = SettingsDialog(Settings(seed=None), NetworkGuard())
    qtbot.add_widget(dialog)
    assert dialog.seed.value() == -1 and dialog.seed.text() == "random"
    dialog.system_prompt.setPlainText("Answer in French.")
    dialog.temperature.setValue(0.7)
    dialog.max_tokens.setValue(2048)
    dialog.seed.setValue(42)
    dialog.theme.setCurrentIndex(dialog.theme.findData("dark"))
    dialog.font_size.setValue(15)
    result = dialog.result_settings()
    assert (result.system_prompt, result.temperature, result.max_tokens, result.seed) == (
        "Answer in French.",
        0.7,
        2048,
        42,
    )
    assert (result.theme, result.font_size) == ("dark", 15)
    assert dialog.tabs.tabText(dialog.tabs.count() - 1) == "Privacy"

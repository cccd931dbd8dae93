"""The banner: no model, loading, demo warning, load error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.state import ModelStatus
from app.widgets.banner import Banner
from engine import api


def test_banner_states(qtbot: Any) -> None:
    status = ModelStatus()
    banner = Banner(status)
    qtbot.add_widget(banner)
    banner.show()
    assert "No model loaded" in banner.label.text() and banner.demo_button.isVisible()
    status.is_loading = True
    status.set_state("loading")
    assert "Loading" in banner.label.text() and not banner.choose_button.isVisible()
    status.is_loading = False
    status.loaded = api.ModelLoaded("r", Path("/d"), "demo", 4096, "cpu", True, True, ("none",))
    status.loaded_changed.emit()
    assert "random" in banner.label.text() and banner.objectName() == "banner_demo"
    status.loaded = api.ModelLoaded("r", Path("/m"), "m", 4096, "cpu", False, True, ("none",))
    status.loaded_changed.emit()
    assert banner.isHidden()
    status.loaded, status.error = None, "Bad folder.\n\nChoose another."
    status.load_failed.emit(status.error)
    assert banner.objectName() == "banner_error" and "Bad folder.<br>" in banner.label.text()

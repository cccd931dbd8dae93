"""The model panel: plan before loading, progress with rate and time left, memory use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.widgets.model_panel import progress_text
from tests.app.helpers import TIMEOUT_MS


def test_progress_text() -> None:
    gib = 1024**3
    assert progress_text(2 * gib, 8 * gib, 4.0, "reading weights") == (
        "2.0 GB of 8.0 GB · 512.0 MB/s · 12 s left · reading weights"
    )
    assert progress_text(0, 10, 0.0, "starting") == "0 B of 10 B · starting"


def test_plan_progress_loaded_and_memory(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    window = make_window()
    qtbot.keyClick(window, Qt.Key.Key_M, Qt.KeyboardModifier.ControlModifier)
    assert window.model_dock.isVisible()
    panel = window.model_panel
    panel.folder_edit.setText(str(tmp_path))
    panel.plan_button.click()
    qtbot.waitUntil(lambda: "Fits" in panel.plan_label.text(), timeout=TIMEOUT_MS)
    assert "expert cache (712 slots)" in panel.plan_label.text()
    seen: list[str] = []
    window.model_status.progress_changed.connect(
        lambda _e: seen.append(panel.progress_label.text())
    )
    panel.load_button.click()
    assert panel.cancel_button.isVisible() and not panel.load_button.isEnabled()
    qtbot.waitUntil(lambda: not window.model_status.is_loading, timeout=TIMEOUT_MS)
    assert window.model_status.is_loaded
    assert "s left" in seen[0] and "reading weights" in seen[0]
    assert "fake-mistral" in panel.model_label.text()
    assert not panel.cancel_button.isVisible() and panel.unload_button.isEnabled()
    window.on_resource_timer_timeout()
    qtbot.waitUntil(lambda: "GPU 0" in panel.memory_label.text(), timeout=TIMEOUT_MS)
    assert "RAM: 9.0 GB of 64.0 GB" in panel.memory_label.text()
    assert window.settings.model_dir == str(tmp_path)
    panel.unload_button.click()
    qtbot.waitUntil(lambda: not window.model_status.is_loaded, timeout=TIMEOUT_MS)
    assert panel.model_label.text() == "No model loaded."


def test_cancel_load(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    from tests.app.fake_engine import Script

    window = make_window(script=Script(delay_s=0.05))
    window.load_model(tmp_path)
    qtbot.waitUntil(lambda: window.model_panel.progress.value() > 0, timeout=TIMEOUT_MS)
    window.model_panel.cancel_button.click()
    qtbot.waitUntil(lambda: not window.model_status.is_loading, timeout=TIMEOUT_MS)
    assert not window.model_status.is_loaded
    assert window.statusBar().state_label.text() == "No model"


def test_plan_failure_is_shown(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    from tests.app.fake_engine import Script

    message = "This folder has no config.json. Choose the folder with the model files."
    window = make_window(script=Script(failures={"PlanModel": ("CheckpointError", message)}))
    window.model_panel.folder_edit.setText(str(tmp_path))
    window.model_panel.plan_button.click()
    qtbot.waitUntil(lambda: message in window.model_panel.error_label.text(), timeout=TIMEOUT_MS)


def test_load_without_a_folder_asks_for_one(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    window.model_panel.folder_edit.clear()
    with qtbot.assert_not_emitted(window.model_panel.load_requested):
        window.model_panel.load_button.click()
    assert "Choose the model folder first" in window.model_panel.error_label.text()
    assert not window.client.is_started

"""The model panel: plan before loading, progress with rate and time left, memory use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.widgets.model_panel import plan_text, progress_text
from engine import api
from tests.app.fake_engine import EIGHT_BIT_HINT, FOUR_BIT_HINT, Script
from tests.app.helpers import TIMEOUT_MS

INT4_ERROR = (
    "4-bit experts (host format int4) need matrices whose rows are a multiple of 64 and inputs "
    "a multiple of 64; this model has 96x40. Choose 8-bit experts (host format auto, fp8 or int8)."
)


def test_progress_text() -> None:
    gb = 10**9
    assert progress_text(2 * gb, 8 * gb, 4.0, "reading weights") == (
        "2.0 GB of 8.0 GB · 500.0 MB/s · 12 s left · reading weights"
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
    assert "RAM: 9.7 GB of 68.7 GB" in panel.memory_label.text()  # 9 and 64 GiB, decimal
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


def submitted(engines: list[Any], kind: type) -> list[Any]:
    return [r for engine in engines for r in engine.submitted if isinstance(r, kind)]


def test_expert_precision_offers_8_and_4_bit(qtbot: Any, make_window: Any) -> None:
    panel = make_window().model_panel
    combo = panel.precision_combo
    options = [(combo.itemData(i), combo.itemText(i)) for i in range(combo.count())]
    assert [data for data, _text in options] == ["auto", "int4"]
    assert "8-bit" in options[0][1] and "default" in options[0][1]
    assert "4-bit" in options[1][1] and "faster" in options[1][1]
    assert "faster" in combo.toolTip() and "accuracy" in combo.toolTip()
    assert combo.accessibleName() == "Expert precision" and panel.host_format() == "auto"


def test_precision_does_not_apply_to_the_nvfp4_release(qtbot: Any, make_window: Any,
                                                       tmp_path: Path) -> None:
    panel = make_window().model_panel
    native = tmp_path / "Mistral-Small-4-119B-2603-NVFP4"
    native.mkdir()
    (native / "params.json").write_text("{}")
    panel.precision_combo.setCurrentIndex(panel.precision_combo.findData("int4"))
    panel.folder_edit.setText(str(native))
    assert not panel.precision_combo.isEnabled() and "NVFP4 release" in panel.precision_combo.toolTip()
    assert panel.precision_combo.currentText() == "" and panel.precision_combo.placeholderText() == \
        "4-bit NVFP4, as shipped"  # what the experts are, not a choice that does not apply
    assert panel.host_format() == "int4"  # the user's choice is kept for other folders
    (native / "config.json").write_text('{"quantization_config": {"quant_method": "compressed-tensors"}}')
    panel.folder_edit.setText(str(native) + "/")  # an HF export of the same release: still NVFP4
    assert not panel.precision_combo.isEnabled()
    (native / "config.json").write_text("{}")  # an HF (FP8-style) folder offers the choice
    panel.folder_edit.setText(str(native))
    assert panel.precision_combo.isEnabled() and "accuracy" in panel.precision_combo.toolTip()
    assert panel.precision_combo.currentData() == "int4"  # and the choice is back
    (native / "config.json").unlink()
    panel.set_values(str(native), 0, 32768, "auto")  # restored at start with a saved folder
    assert not panel.precision_combo.isEnabled() and panel.host_format() == "auto"
    panel.set_values(str(native) + "/", 0, 32768, "int4")  # values set while greyed out
    assert panel.precision_combo.placeholderText() == "4-bit NVFP4, as shipped"
    assert panel.precision_combo.currentIndex() < 0 and panel.host_format() == "int4"
    panel.set_values(str(tmp_path), 0, 32768, "auto")  # then a folder that takes a choice
    assert panel.precision_combo.isEnabled() and panel.host_format() == "auto"
    (native / "params.json").write_text('{"quantization": {"qformat_weight": "fp8_e4m3"}}')
    panel.folder_edit.setText(str(native))  # Mistral's native FP8 copy is not the NVFP4 release
    assert panel.precision_combo.isEnabled()


def test_precision_change_replans_is_saved_loads_and_is_restored(
    qtbot: Any, make_window: Any, data_dir: Path, tmp_path: Path
) -> None:
    created: list[Any] = []
    window = make_window(created=created)
    window.model_dock.show()
    panel = window.model_panel
    panel.folder_edit.setText(str(tmp_path))
    panel.plan_button.click()
    qtbot.waitUntil(lambda: "Fits" in panel.plan_label.text(), timeout=TIMEOUT_MS)
    assert FOUR_BIT_HINT in panel.plan_label.text()  # the preview says what 4-bit would cache
    panel.precision_combo.setFocus()
    qtbot.keyClick(panel.precision_combo, Qt.Key.Key_Down)  # as the user picks 4-bit
    assert panel.host_format() == "int4"
    qtbot.waitUntil(lambda: EIGHT_BIT_HINT in panel.plan_label.text(), timeout=TIMEOUT_MS)
    plans = submitted(created, api.PlanModel)
    assert [(p.model_dir, p.host_format) for p in plans] == [(tmp_path, "auto"), (tmp_path, "int4")]
    assert json.loads(window.settings_file.path.read_text())["host_format"] == "int4"
    panel.load_button.click()
    qtbot.waitUntil(lambda: window.model_status.is_loaded, timeout=TIMEOUT_MS)
    assert [load.host_format for load in submitted(created, api.LoadModel)] == ["int4"]
    window.close()
    again_created: list[Any] = []
    again = make_window(directory=data_dir, created=again_created)
    assert again.model_panel.host_format() == "int4"
    assert "4-bit" in again.model_panel.precision_combo.currentText()
    again.start()  # loads the folder used last time, as it was loaded
    qtbot.waitUntil(lambda: again.model_status.is_loaded, timeout=TIMEOUT_MS)
    [load] = submitted(again_created, api.LoadModel)
    assert (load.model_dir, load.host_format) == (tmp_path, "int4")


def test_precision_without_a_folder_is_saved_without_planning(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    window.model_panel.folder_edit.clear()
    window.model_panel.precision_combo.setCurrentIndex(1)
    assert window.settings.host_format == "int4" and not window.client.is_started
    assert window.model_panel.error_label.text() == ""


def test_demo_loads_8_bit_whatever_the_choice(qtbot: Any, make_window: Any) -> None:
    created: list[Any] = []
    window = make_window(created=created)
    window.model_panel.precision_combo.setCurrentIndex(1)
    window.load_demo()
    qtbot.waitUntil(lambda: window.model_status.is_demo, timeout=TIMEOUT_MS)
    [load] = submitted(created, api.LoadModel)
    assert load.create_demo and load.host_format == "auto"


def test_a_model_that_cannot_use_4_bit_says_so_and_recovers(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    window = make_window(script=Script(int4_error=INT4_ERROR))
    panel = window.model_panel
    panel.folder_edit.setText(str(tmp_path))
    panel.plan_button.click()
    qtbot.waitUntil(lambda: "Fits" in panel.plan_label.text(), timeout=TIMEOUT_MS)
    panel.precision_combo.setCurrentIndex(1)
    qtbot.waitUntil(lambda: INT4_ERROR in panel.error_label.text(), timeout=TIMEOUT_MS)
    assert "model panel (Ctrl+M)" in panel.error_label.text()
    assert "Shorten" not in panel.error_label.text()
    assert panel.plan_label.text() == "No plan for these settings."  # not the 8-bit plan
    assert window.banner.isVisible() and "4-bit experts" in window.banner.label.text()
    panel.precision_combo.setCurrentIndex(0)
    qtbot.waitUntil(lambda: "Fits" in panel.plan_label.text(), timeout=TIMEOUT_MS)
    assert panel.error_label.text() == "" and "4-bit" not in window.banner.label.text()
    panel.precision_combo.setCurrentIndex(1)
    panel.load_button.click()
    qtbot.waitUntil(
        lambda: not window.model_status.is_loading and INT4_ERROR in panel.error_label.text(),
        timeout=TIMEOUT_MS,
    )
    assert not window.model_status.is_loaded and panel.load_button.isEnabled()


def test_the_plan_says_its_verdict_once() -> None:
    """The engine's summary starts with its own verdict; the panel shows it once, in bold."""
    plan = api.PlanReady("p", Path("/m"), True, "fits: 3.0 GB dense on GPU 0", (), 0, 0)
    assert plan_text(plan).startswith("<b>Fits.</b> 3.0 GB dense on GPU 0")
    short = api.PlanReady("p", Path("/m"), False, "does not fit: RAM is short.", (), 0, 0)
    assert plan_text(short).startswith("<b>Does not fit.</b> RAM is short.")
    cache = api.PlanPart("cuda:0", "expert cache (798 slots)", 20_082_327_552)
    listed = api.PlanReady("p", Path("/m"), True, "fits: 20 GB expert cache", (cache,), 0, 0)
    assert "expert cache (798 slots) (20.1 GB)" in plan_text(listed)  # as the sentence counts

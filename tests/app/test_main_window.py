"""The main window's wiring: accessible names, shortcuts, context meter, close."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QAbstractButton, QAbstractSpinBox, QLineEdit, QPlainTextEdit, QSlider

from tests.app.helpers import TIMEOUT_MS, load


def test_every_control_has_an_accessible_name_or_text(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    window.model_dock.show()
    nameless = []
    for kind in (QAbstractButton, QLineEdit, QPlainTextEdit, QSlider):
        for widget in window.findChildren(kind):
            text = widget.text() if isinstance(widget, QAbstractButton) else ""
            parent = widget.parentWidget()  # a spin box's inner line edit: the box is named
            inherited = parent.accessibleName() if isinstance(parent, QAbstractSpinBox) else ""
            if widget.isVisible() and not (widget.accessibleName() or text or inherited):
                nameless.append(f"{type(widget).__name__} {widget.objectName()}")
    assert nameless == []


def test_context_meter_counts_the_draft(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    load(qtbot, window)
    window.composer.edit.setPlainText("How long is this?")
    qtbot.waitUntil(lambda: window.metrics.context is not None, timeout=TIMEOUT_MS)
    bar = window.statusBar()
    assert bar.context_label.text() == "context: 1,064 / 4,096"


def test_resource_poll_only_when_loaded_and_idle(qtbot: Any, make_window: Any) -> None:
    created: list[Any] = []
    window = make_window(created=created)
    window.on_resource_timer_timeout()
    assert not window.client.is_started  # nothing loaded: no engine, no torch
    load(qtbot, window)
    assert window._resource_timer.isActive()
    window.on_resource_timer_timeout()
    assert type(created[0].submitted[-1]).__name__ == "QueryResources"


def test_start_loads_what_was_used_last_time(qtbot: Any, make_window: Any, data_dir: Any) -> None:
    window = make_window()
    window.start(demo=True)
    qtbot.waitUntil(lambda: window.model_status.is_demo, timeout=TIMEOUT_MS)
    window.close()
    created: list[Any] = []
    again = make_window(directory=data_dir, created=created)
    again.start()
    qtbot.waitUntil(lambda: again.model_status.is_loaded, timeout=TIMEOUT_MS)
    assert created[0].submitted[0].create_demo
    assert again.settings.use_demo


def test_close_stops_the_engine(qtbot: Any, make_window: Any) -> None:
    created: list[Any] = []
    window = make_window(created=created)
    load(qtbot, window)
    window.close()
    assert not created[0].is_running and window.store.is_closed

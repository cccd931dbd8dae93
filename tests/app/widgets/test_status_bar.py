"""The status bar: engine state, speed, and an honest context meter."""

from __future__ import annotations

from typing import Any

from app.state import Metrics, ModelStatus
from app.widgets.status_bar import StatusBar
from engine import api


def test_state_speed_and_context(qtbot: Any) -> None:
    status, metrics = ModelStatus(), Metrics()
    bar = StatusBar(status, metrics)
    qtbot.add_widget(bar)
    assert bar.state_label.text() == "No model"
    status.set_state("generating")
    assert bar.state_label.text() == "Writing…"
    metrics.set_stats(api.Stats("r", 10, 0, 5, 0.25, 900.0, 31.0, 9, 1, 0.9))
    assert bar.speed_label.text() == (
        "first token 0.25 s · 31.0 tok/s · prefill 900 tok/s · expert hits 90%"
    )
    parts = (api.TokenCountPart("report.pdf", 3000), api.TokenCountPart("answer reserve", 1024))
    metrics.set_context(api.TokenCount("c", 4024, 8192, parts, True))
    assert bar.context_label.text() == "context: 4,024 / 8,192"
    assert bar.context_bar.value() == 491
    assert "report.pdf: 3,000 tokens" in bar.context_bar.toolTip()
    metrics.set_context(api.TokenCount("c", 9000, 8192, parts, False))
    assert "too long" in bar.context_label.text()
    assert "remove a document" in bar.context_label.toolTip()

"""The status bar: engine state, speed of the last answer, and the context meter."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Slot
from PySide6.QtWidgets import QLabel, QProgressBar, QStatusBar, QWidget

from app.state import Metrics, ModelStatus

STATE_TEXT = {
    "unloaded": "No model",
    "loading": "Loading model…",
    "idle": "Ready",
    "prefill": "Reading the prompt…",
    "generating": "Writing…",
}


def context_tooltip(count: Any) -> str:
    lines = [f"{part.label}: {part.num_tokens:,} tokens" for part in count.parts]
    lines.append(f"total {count.total:,} of {count.context_length:,}")
    if not count.fits:
        lines.append("Too long: remove a document or start a new chat.")
    return "\n".join(lines)


class StatusBar(QStatusBar):
    def __init__(
        self, status: ModelStatus, metrics: Metrics, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.state_label = QLabel(self)
        self.state_label.setAccessibleName("Engine state")
        self.speed_label = QLabel(self)
        self.speed_label.setAccessibleName("Speed of the last answer")
        self.context_bar = QProgressBar(self, maximum=1000, textVisible=False)
        self.context_bar.setFixedWidth(120)
        self.context_bar.setAccessibleName("Context used")
        self.context_label = QLabel("context: –", self)
        self.addWidget(self.state_label)
        self.addPermanentWidget(self.speed_label)
        self.addPermanentWidget(self.context_label)
        self.addPermanentWidget(self.context_bar)
        status.state_changed.connect(self.on_status_state_changed)
        metrics.stats_changed.connect(self.on_metrics_stats_changed)
        metrics.context_changed.connect(self.on_metrics_context_changed)
        self.on_status_state_changed(status.state)

    @Slot(str)
    def on_status_state_changed(self, state: str) -> None:
        self.state_label.setText(STATE_TEXT.get(state, state))

    @Slot(object)
    def on_metrics_stats_changed(self, stats: Any) -> None:
        self.speed_label.setText(
            f"first token {stats.time_to_first_token_s:.2f} s · "
            f"{stats.decode_tokens_per_s:.1f} tok/s · "
            f"prefill {stats.prefill_tokens_per_s:.0f} tok/s · "
            f"expert hits {stats.expert_hit_rate:.0%}"
        )

    @Slot(object)
    def on_metrics_context_changed(self, count: Any) -> None:
        limit = max(1, count.context_length)
        self.context_bar.setValue(min(1000, int(1000 * count.total / limit)))
        warning = "" if count.fits else " — too long!"
        self.context_label.setText(f"context: {count.total:,} / {limit:,}{warning}")
        self.context_label.setObjectName("" if count.fits else "errorLabel")
        self.context_label.setToolTip(context_tooltip(count))
        self.context_bar.setToolTip(context_tooltip(count))

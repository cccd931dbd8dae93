"""The model panel: folder, placement plan, load progress, cancel/unload, memory use."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import Signal, SignalInstance, Slot
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.settings import HOST_FORMATS
from app.state import ModelStatus
from app.widgets.message_view import format_bytes

CONTEXT_LENGTHS = (8192, 16384, 32768, 65536, 131072, 262144)
# What the user reads for each way the offloaded experts can be held (app.settings.HOST_FORMATS).
PRECISION_LABELS = {"auto": "8-bit (more exact, default)", "int4": "4-bit (faster, less exact)"}
PRECISION_TIP = (
    "4-bit experts take just over half the memory of 8-bit ones, so the GPU caches more of them "
    "and answers come faster, at a small cost in accuracy. Applies at the next load; some "
    "models, like the demo, support only 8-bit."
)
NVFP4_LABEL = "4-bit NVFP4, as shipped"
NVFP4_TIP = (
    "This folder is Mistral's NVFP4 release: its experts are 4-bit as Mistral ships them, so "
    "there is no precision to choose."
)
GIB = 1024**3


def is_nvfp4_release(folder: Path) -> bool:
    """Mistral's native NVFP4 release: params.json without config.json, or beside one naming
    compressed-tensors weights (the engine reads its experts as shipped, whatever precision is
    chosen; engine.checkpoint decides the same way). Not Mistral's native FP8 copy, whose
    params.json names fp8 weights."""
    try:
        params = json.loads((folder / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = params.get("quantization") if isinstance(params, dict) else None
    if isinstance(quantization, dict) and "fp8" in str(quantization.get("qformat_weight", "")):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def progress_text(done: int, total: int, elapsed_s: float, stage: str) -> str:
    """ "1.2 GB of 5.0 GB · 300 MB/s · 12 s left · reading weights"."""
    parts = [f"{format_bytes(done)} of {format_bytes(total)}"]
    if elapsed_s > 0 and done > 0:
        rate = done / elapsed_s
        parts.append(f"{format_bytes(rate)}/s")
        if total > done:
            parts.append(f"{(total - done) / rate:.0f} s left")
    parts.append(stage)
    return " · ".join(parts)


def plan_text(plan: Any) -> str:
    if plan is None:  # the last plan request failed: its message is shown below
        return "No plan for these settings."
    verdict = "Fits" if plan.fits else "Does not fit"
    summary = plan.summary  # the engine's own verdict leads it: said once, in bold
    for said in ("fits: ", "does not fit: "):
        summary = summary.removeprefix(said)
    lines = [f"<b>{verdict}.</b> {summary}", "<ul>"]
    for part in plan.parts:
        lines.append(f"<li>{part.device}: {part.what} ({format_bytes(part.num_bytes)})</li>")
    lines.append("</ul>")
    lines.append(f"GPU memory {format_bytes(plan.gpu_bytes)}, host memory {format_bytes(plan.host_bytes)}.")
    if plan.alternative:  # what the other expert precision would cache
        lines.append(f"<br><i>{html.escape(plan.alternative)}</i>")
    return "".join(lines)


class ModelPanel(QWidget):
    """Views `ModelStatus`; emits what the user asks for."""

    plan_requested = Signal(Path)
    load_requested = Signal(Path)
    demo_requested = Signal()
    cancel_requested = Signal()
    unload_requested = Signal()
    budget_changed = Signal(float, int)  # GiB per GPU (0 = automatic), context length
    precision_changed = Signal(str)  # host format: "auto" (8-bit) or "int4"

    def __init__(self, status: ModelStatus, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.status = status
        self.setObjectName("modelPanel")
        self.setMinimumWidth(400)
        self._build_widgets()
        self._build_layout()
        status.state_changed.connect(self.on_status_state_changed)
        status.plan_changed.connect(self.on_status_plan_changed)
        status.progress_changed.connect(self.on_status_progress_changed)
        status.loaded_changed.connect(self.on_status_loaded_changed)
        status.load_failed.connect(self.on_status_load_failed)
        status.resources_changed.connect(self.on_status_resources_changed)
        self.on_status_loaded_changed()

    def _build_widgets(self) -> None:
        self.folder_edit = QLineEdit(self, placeholderText="Folder of the Mistral Small 4 model")
        self.folder_edit.setAccessibleName("Model folder")
        self.browse_button = QPushButton("Choose folder…", self)
        self.browse_button.clicked.connect(self.on_browse_button_clicked)
        # GiB, as GPU makers size memory (a "24 GB" card holds 24 GiB); the plan counts in GB.
        self.budget_spin = QDoubleSpinBox(self, suffix=" GiB", maximum=4096, decimals=0)
        self.budget_spin.setSpecialValueText("automatic")
        self.budget_spin.setToolTip("GPU memory Quire may use on each GPU, in GiB as GPU makers "
                                    "count it (a 24 GB card holds 24 GiB). Automatic: what is "
                                    "free, less a safety margin.")
        self.budget_spin.setAccessibleName("VRAM budget per GPU")
        self.context_combo = QComboBox(self)
        self.context_combo.setAccessibleName("Context length")
        for length in CONTEXT_LENGTHS:
            self.context_combo.addItem(f"{length // 1024}K tokens", length)
        self.precision_combo = QComboBox(self)
        self._chosen_precision = 0  # the combo's index while an NVFP4 folder greys it out
        self._shipped = False  # the folder is the NVFP4 release: the choice does not apply
        self.precision_combo.setAccessibleName("Expert precision")
        for host_format in HOST_FORMATS:
            self.precision_combo.addItem(PRECISION_LABELS[host_format], host_format)
        self.precision_combo.setToolTip(PRECISION_TIP)
        self.budget_spin.valueChanged.connect(self._emit_budget)
        self.context_combo.currentIndexChanged.connect(self._emit_budget)
        self.precision_combo.currentIndexChanged.connect(
            lambda: self.precision_changed.emit(self.host_format())
        )
        self.folder_edit.textChanged.connect(self._show_precision_for_folder)
        self.plan_button = QPushButton("Check plan", self)
        self.plan_button.clicked.connect(lambda: self._emit_for_folder(self.plan_requested))
        self.load_button = QPushButton("Load", self)
        self.load_button.clicked.connect(lambda: self._emit_for_folder(self.load_requested))
        self.demo_button = QPushButton("Use the demo model", self)
        self.demo_button.clicked.connect(self.demo_requested)
        self.cancel_button = QPushButton("Cancel loading", self)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.unload_button = QPushButton("Unload", self)
        self.unload_button.clicked.connect(self.unload_requested)
        self.plan_label = QLabel("Choose a folder, then check the plan before loading.", self)
        self.progress = QProgressBar(self, maximum=1000)
        self.progress.setAccessibleName("Load progress")
        self.progress_label = QLabel(self)
        self.model_label = QLabel("No model loaded.", self)
        self.memory_label = QLabel(self)
        self.error_label = QLabel(self)
        self.error_label.setObjectName("errorLabel")
        for label in (self.plan_label, self.progress_label, self.model_label, self.error_label):
            label.setWordWrap(True)

    def _build_layout(self) -> None:
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.browse_button)
        form = QFormLayout()
        form.addRow("VRAM budget per GPU", self.budget_spin)
        form.addRow("Context length", self.context_combo)
        form.addRow("Expert precision", self.precision_combo)
        buttons = QHBoxLayout()
        for button in (self.plan_button, self.load_button, self.cancel_button, self.unload_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_label)
        layout.addWidget(self.memory_label)
        layout.addLayout(folder_row)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.demo_button)
        layout.addWidget(self.plan_label)
        layout.addWidget(self.progress)
        layout.addWidget(self.progress_label)
        layout.addWidget(self.error_label)
        layout.addStretch(1)

    # ------------------------------------------------------------------ API
    def folder(self) -> Path:
        return Path(self.folder_edit.text().strip()).expanduser()

    def set_values(
        self, folder: str, budget_gb: float, context_length: int, host_format: str = "auto"
    ) -> None:
        # The precision before the folder: an NVFP4 release folder then greys the choice out.
        index = max(0, self.precision_combo.findData(host_format))
        if self._shipped:
            self._chosen_precision = index  # shown again when a folder takes a choice
        else:
            self.precision_combo.setCurrentIndex(index)
        self.folder_edit.setText(folder)
        self.folder_edit.setCursorPosition(0)
        self._show_precision_for_folder()  # the folder may have changed on disk since
        self.budget_spin.setValue(budget_gb)
        index = self.context_combo.findData(context_length)
        self.context_combo.setCurrentIndex(index if index >= 0 else 2)

    def _show_precision_for_folder(self) -> None:
        """The choice does not apply to the NVFP4 release: greyed out, saying what the experts
        are and why; the user's choice comes back for any other folder (and stays saved)."""
        combo = self.precision_combo
        shipped = bool(self.folder_edit.text().strip()) and is_nvfp4_release(self.folder())
        if shipped == self._shipped:
            return
        self._shipped = shipped
        combo.blockSignals(True)  # not a change of the user's choice
        if shipped:
            self._chosen_precision = combo.currentIndex()
            combo.setPlaceholderText(NVFP4_LABEL)
            combo.setCurrentIndex(-1)
        else:
            combo.setCurrentIndex(max(0, self._chosen_precision))
        combo.blockSignals(False)
        combo.setEnabled(not shipped)
        combo.setToolTip(NVFP4_TIP if shipped else PRECISION_TIP)

    def _emit_for_folder(self, signal: SignalInstance) -> None:
        if not self.folder_edit.text().strip():
            self.error_label.setText("Choose the model folder first (Choose folder…).")
            return
        signal.emit(self.folder())

    def budget_bytes(self) -> int | None:
        value = self.budget_spin.value()
        return int(value * GIB) if value > 0 else None

    def context_length(self) -> int:
        return int(self.context_combo.currentData())

    def host_format(self) -> str:
        """The engine's host_format for the offloaded experts: "auto" (8-bit) or "int4" (for
        an NVFP4 release folder the user's choice, which the engine overrides)."""
        if self._shipped:
            return str(self.precision_combo.itemData(max(0, self._chosen_precision)))
        return str(self.precision_combo.currentData())

    def _emit_budget(self) -> None:
        self.budget_changed.emit(self.budget_spin.value(), self.context_length())

    # ------------------------------------------------------------------ slots
    @Slot()
    def on_browse_button_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Choose the model folder", self.folder_edit.text()
        )
        if folder:
            self.folder_edit.setText(folder)
            self.plan_requested.emit(Path(folder))

    @Slot(str)
    def on_status_state_changed(self, state: str) -> None:
        is_loading = self.status.is_loading
        self.cancel_button.setVisible(is_loading)
        self.load_button.setEnabled(not is_loading)
        self.demo_button.setEnabled(not is_loading)
        self.progress.setVisible(is_loading)
        self.progress_label.setVisible(is_loading)
        self.unload_button.setEnabled(self.status.is_loaded and state == "idle")
        self.error_label.setText(self.status.error)

    @Slot(object)
    def on_status_plan_changed(self, plan: Any) -> None:
        self.plan_label.setText(plan_text(plan))

    @Slot(object)
    def on_status_progress_changed(self, event: Any) -> None:
        total = max(1, event.total_bytes)
        self.progress.setValue(int(1000 * event.done_bytes / total))
        self.progress_label.setText(
            progress_text(event.done_bytes, event.total_bytes, event.elapsed_s, event.stage)
        )

    @Slot()
    def on_status_loaded_changed(self) -> None:
        loaded = self.status.loaded
        if loaded is None:
            self.model_label.setText("No model loaded.")
            self.memory_label.clear()
            self.memory_label.hide()
        else:
            demo = " (demo: random answers)" if loaded.is_demo else ""
            self.model_label.setText(
                f"<b>{loaded.model_name}</b>{demo}<br>{loaded.device_summary}<br>"
                f"context {loaded.context_length:,} tokens"
            )
        self.on_status_state_changed(self.status.state)

    @Slot(str)
    def on_status_load_failed(self, _message: str) -> None:
        self.on_status_state_changed(self.status.state)

    @Slot(object)
    def on_status_resources_changed(self, usage: Any) -> None:
        gpus = [
            f"GPU {i}: {format_bytes(used)} of {format_bytes(total)}"
            for i, (used, total) in enumerate(zip(usage.gpu_used_bytes, usage.gpu_total_bytes))
        ]
        host = (
            f"RAM: {format_bytes(usage.host_used_bytes)} of {format_bytes(usage.host_total_bytes)}"
        )
        self.memory_label.setText("In use: " + " · ".join([*gpus, host]))
        self.memory_label.show()

"""The banner above the chat: no model yet, demo warning, loading, or a load error."""

from __future__ import annotations

from PySide6.QtCore import Signal, Slot
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QWidget

from app.state import ModelStatus

NO_MODEL = (
    "<b>No model loaded.</b> Choose the folder of the Mistral Small 4 model, "
    "or try the built-in demo."
)
DEMO = (
    "<b>Demo model:</b> a tiny untrained model answers with random text. "
    "Choose a model folder for real answers."
)


class Banner(QFrame):
    """Follows `ModelStatus`; its buttons ask for a folder or the demo."""

    choose_requested = Signal()
    demo_requested = Signal()

    def __init__(self, status: ModelStatus, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.status = status
        self.label = QLabel(self, wordWrap=True)
        self.choose_button = QPushButton("Choose model folder…", self)
        self.choose_button.clicked.connect(self.choose_requested)
        self.demo_button = QPushButton("Try the demo", self)
        self.demo_button.clicked.connect(self.demo_requested)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(12, 6, 12, 6)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.choose_button)
        layout.addWidget(self.demo_button)
        status.state_changed.connect(self.on_status_changed)
        status.loaded_changed.connect(self.on_status_changed)
        status.load_failed.connect(self.on_status_load_failed)
        self.on_status_changed()

    def _show(self, kind: str, text: str, buttons: bool) -> None:
        self.setObjectName(f"banner_{kind}")
        self.style().unpolish(self)
        self.style().polish(self)
        self.label.setText(text)
        self.choose_button.setVisible(buttons)
        self.demo_button.setVisible(buttons and kind != "demo")
        self.show()

    @Slot()
    def on_status_changed(self, *_args: object) -> None:
        status = self.status
        if status.is_loading:
            self._show(
                "info", "<b>Loading the model…</b> You can keep reading your history.", False
            )
        elif status.is_demo:
            self._show("demo", DEMO, True)
        elif status.is_loaded:
            self.hide()
        elif status.error:
            self._show("error", status.error.replace("\n", "<br>"), True)
        else:
            self._show("info", NO_MODEL, True)

    @Slot(str)
    def on_status_load_failed(self, _message: str) -> None:
        self.on_status_changed()

"""Settings: system prompt, sampling, appearance, and the privacy panel."""

from __future__ import annotations

from dataclasses import replace

from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QListWidget,
    QPlainTextEdit,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.privacy import NetworkGuard
from app.settings import THEMES, Settings


class SettingsDialog(QDialog):
    """Edits a copy of `Settings`; `result_settings()` returns the edited copy."""

    def __init__(
        self, settings: Settings, guard: NetworkGuard, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self._settings = settings
        self.tabs = tabs = QTabWidget(self)
        tabs.addTab(self._answers_tab(settings), "Answers")
        tabs.addTab(self._appearance_tab(settings), "Appearance")
        tabs.addTab(PrivacyPanel(guard, self), "Privacy")
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(tabs)
        layout.addWidget(buttons)
        self.resize(520, 420)

    def _answers_tab(self, s: Settings) -> QWidget:
        page = QWidget(self)
        self.system_prompt = QPlainTextEdit(s.system_prompt, page)
        self.system_prompt.setAccessibleName("System prompt")
        self.temperature = QDoubleSpinBox(
            page, minimum=0, maximum=2, singleStep=0.05, value=s.temperature
        )
        self.temperature.setAccessibleName("Temperature")
        self.top_p = QDoubleSpinBox(page, minimum=0.01, maximum=1, singleStep=0.05, value=s.top_p)
        self.top_p.setAccessibleName("Top p")
        self.max_tokens = QSpinBox(page, minimum=16, maximum=262144, value=s.max_tokens)
        self.max_tokens.setAccessibleName("Max tokens")
        self.seed = QSpinBox(
            page, minimum=-1, maximum=2**31 - 1, value=-1 if s.seed is None else s.seed
        )
        self.seed.setSpecialValueText("random")
        self.seed.setAccessibleName("Seed")
        form = QFormLayout(page)
        form.addRow("System prompt", self.system_prompt)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top p", self.top_p)
        form.addRow("Max answer tokens", self.max_tokens)
        form.addRow("Seed", self.seed)
        return page

    def _appearance_tab(self, s: Settings) -> QWidget:
        page = QWidget(self)
        self.theme = QComboBox(page)
        self.theme.setAccessibleName("Theme")
        for theme in THEMES:
            self.theme.addItem({"system": "Follow the system"}.get(theme, theme.title()), theme)
        self.theme.setCurrentIndex(THEMES.index(s.theme))
        self.font_size = QSpinBox(page, minimum=8, maximum=24, value=s.font_size, suffix=" pt")
        self.font_size.setAccessibleName("Font size")
        form = QFormLayout(page)
        form.addRow("Theme", self.theme)
        form.addRow("Font size", self.font_size)
        return page

    def result_settings(self) -> Settings:
        seed = self.seed.value()
        return replace(
            self._settings,
            system_prompt=self.system_prompt.toPlainText(),
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            max_tokens=self.max_tokens.value(),
            seed=None if seed < 0 else seed,
            theme=str(self.theme.currentData()),
            font_size=self.font_size.value(),
        )


class PrivacyPanel(QWidget):
    """How many network connections were attempted (and refused) since start."""

    def __init__(self, guard: NetworkGuard, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        count = guard.num_attempts
        verdict = (
            "No network connection was attempted."
            if count == 0
            else "These attempts were refused; nothing left this computer."
        )
        self.count_label = QLabel(
            f"<h3>Network connection attempts since start: {count}</h3>"
            f"<p>{verdict}</p><p>Quire refuses every connection to an address outside this "
            "computer. Loopback (127.0.0.1) is allowed.</p>",
            self,
        )
        self.count_label.setWordWrap(True)
        self.count_label.setAccessibleName(f"Network connection attempts: {count}")
        self.attempts = QListWidget(self)
        self.attempts.setAccessibleName("Refused connections")
        self.attempts.addItems(guard.attempts)
        layout = QVBoxLayout(self)
        layout.addWidget(self.count_label)
        layout.addWidget(self.attempts, 1)

"""The main window: composition and wiring only (state, controllers, widgets, actions)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Slot
from PySide6.QtGui import (
    QAction,
    QCloseEvent,
    QDragEnterEvent,
    QDragLeaveEvent,
    QDropEvent,
    QGuiApplication,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QMainWindow,
    QMessageBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.attachments import AttachmentController
from app.budget import BudgetController
from app.chat import ChatController
from app.document_dialogs import DocumentDialogs
from app.engine_client import EngineClient, EngineFactory, real_engine
from app.errors import AppError
from app.pages import PageController
from app.privacy import NetworkGuard
from app.settings import Settings, SettingsFile, atomic_write_text, snapshot_dir_for
from app.state import AttachmentList, ConversationState, Metrics, ModelStatus
from app.store import Store
from app.theme import apply_theme
from app.widgets.banner import Banner
from app.widgets.chat_view import ChatView
from app.widgets.composer import Composer
from app.widgets.conversation_list import ConversationList
from app.widgets.dialogs import ShortcutsDialog
from app.widgets.drop_zone import DropOverlay, local_paths
from app.widgets.model_panel import ModelPanel
from app.widgets.settings_dialog import SettingsDialog
from app.widgets.status_bar import StatusBar

log = logging.getLogger(__name__)

RESOURCE_POLL_MS = 5000
FILE_FILTER = (
    "Documents and images (*.pdf *.docx *.txt *.md *.html *.htm *.csv *.png *.jpg "
    "*.jpeg *.webp *.tif *.tiff *.bmp);;All files (*)"
)


class MainWindow(QMainWindow):
    """Builds the app's objects, wires their signals, and owns their lifetime."""

    def __init__(
        self,
        data_dir: Path,
        engine_factory: EngineFactory = real_engine,
        guard: NetworkGuard | None = None,
    ) -> None:
        super().__init__()
        self.setWindowTitle("Quire")
        self.setAcceptDrops(True)
        self.data_dir = data_dir
        self.guard = guard or NetworkGuard()
        self.settings_file = SettingsFile(data_dir)
        self.settings = self.settings_file.load()
        self.store = Store(data_dir / "history.sqlite3")
        self.conversation = ConversationState(self)
        self.attachments = AttachmentList(self)
        self.model_status = ModelStatus(self)
        self.metrics = Metrics(self)
        self.client = EngineClient(self.model_status, engine_factory, self)
        self.chat = ChatController(
            self.store,
            self.client,
            self.conversation,
            self.attachments,
            self.metrics,
            lambda: self.settings,
            self,
        )
        self.attacher = AttachmentController(self.client, self.attachments, self)
        self.budget = BudgetController(
            self.client, self.conversation, self.metrics, lambda: self.settings, self
        )
        self.pages = PageController(self.client, self)
        self.dialogs = DocumentDialogs(
            self, self.pages, self.budget, self.attachments, self._send_draft
        )
        self._build_widgets()
        self._build_actions()
        self._wire()
        self._resource_timer = QTimer(self, interval=RESOURCE_POLL_MS)
        self._resource_timer.timeout.connect(self.on_resource_timer_timeout)
        self.refresh_conversations()
        self.resize(1180, 780)

    # ------------------------------------------------------------------ construction
    def _build_widgets(self) -> None:
        self.sidebar = ConversationList(self)
        self.banner = Banner(self.model_status, self)
        self.chat_view = ChatView(self.conversation, self)
        self.composer = Composer(self.conversation, self.attachments, self)
        centre = QWidget(self)
        column = QVBoxLayout(centre)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        column.addWidget(self.banner)
        column.addWidget(self.chat_view, 1)
        column.addWidget(self.composer)
        splitter = QSplitter(Qt.Orientation.Horizontal, self)
        splitter.addWidget(self.sidebar)
        splitter.addWidget(centre)
        splitter.setSizes([260, 920])
        splitter.setStretchFactor(1, 1)
        self.setCentralWidget(splitter)
        self.model_panel = ModelPanel(self.model_status, self)
        saved = self.settings
        self.model_panel.set_values(
            saved.model_dir, saved.gpu_budget_gb, saved.context_length, saved.host_format
        )
        self.model_dock = QDockWidget("Model", self)
        self.model_dock.setObjectName("modelDock")
        self.model_dock.setWidget(self.model_panel)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.model_dock)
        self.model_dock.hide()
        self.setStatusBar(StatusBar(self.model_status, self.metrics, self))
        self.drop_overlay = DropOverlay(self)

    def _action(
        self, menu_name: str, text: str, keys: str | QKeySequence.StandardKey, slot: object
    ) -> QAction:
        action = QAction(text, self, shortcut=QKeySequence(keys))
        action.triggered.connect(slot)
        menus = getattr(self, "_menus", {})
        if menu_name not in menus:
            menus[menu_name] = self.menuBar().addMenu(menu_name)
            self._menus = menus
        menus[menu_name].addAction(action)
        return action

    def _build_actions(self) -> None:
        self._action("&File", "New chat", "Ctrl+N", self.on_new_action_triggered)
        self._action("&File", "Attach files…", "Ctrl+O", self.on_attach_action_triggered)
        self._action("&File", "Export as Markdown…", "Ctrl+E", self.on_export_action_triggered)
        self._action("&File", "Quit", "Ctrl+Q", self.close)
        self._action("&Edit", "Find conversation", "Ctrl+F", self.on_find_action_triggered)
        self._action("&Edit", "Stop answer", "Esc", self.composer.on_edit_escape_pressed)
        self._action("&Edit", "Settings…", "Ctrl+,", self.on_settings_action_triggered)
        toggle = self.model_dock.toggleViewAction()
        toggle.setShortcut(QKeySequence("Ctrl+M"))
        toggle.setText("Model panel")
        self.addAction(toggle)  # the dock is hidden: its own shortcut context would be dead
        self._menus["&View"] = self.menuBar().addMenu("&View")
        self._menus["&View"].addAction(toggle)
        self._action("&Help", "Keyboard shortcuts", "Ctrl+/", self.on_shortcuts_action_triggered)
        self._action("&Help", "Privacy…", "", self.on_privacy_action_triggered)

    def _wire(self) -> None:
        sidebar, composer, chat, panel = self.sidebar, self.composer, self.chat, self.model_panel
        sidebar.selected.connect(chat.open_conversation)
        sidebar.new_requested.connect(self.on_new_action_triggered)
        sidebar.rename_requested.connect(chat.rename)
        sidebar.delete_requested.connect(chat.delete)
        sidebar.undo_requested.connect(chat.undo_delete)
        sidebar.export_requested.connect(self.export_conversation)
        sidebar.search_changed.connect(self.refresh_conversations)
        chat.conversations_changed.connect(self.refresh_conversations)
        composer.send_requested.connect(self.on_composer_send_requested)
        composer.stop_requested.connect(chat.stop)
        composer.effort_selected.connect(chat.set_effort)
        composer.attach_requested.connect(self.on_attach_action_triggered)
        composer.files_dropped.connect(self.add_files)
        composer.draft_changed.connect(chat.count_context)
        self.attachments.changed.connect(lambda: chat.count_context(composer.text()))
        self.attacher.message.connect(composer.show_message)
        self.conversation.error_shown.connect(composer.show_message)
        self.conversation.reset.connect(
            lambda: sidebar.select_id(self.conversation.conversation_id)
        )
        self.chat_view.regenerate_requested.connect(chat.regenerate)
        self.chat_view.edit_requested.connect(self.on_chat_view_edit_requested)
        self.chat_view.citation_requested.connect(self.dialogs.open_citation)
        self.dialogs.message.connect(composer.show_message)
        self.banner.choose_requested.connect(self.on_banner_choose_requested)
        self.banner.demo_requested.connect(self.load_demo)
        panel.plan_requested.connect(self.on_model_panel_plan_requested)
        panel.load_requested.connect(self.load_model)
        panel.demo_requested.connect(self.load_demo)
        panel.cancel_requested.connect(self.client.cancel_load)
        panel.unload_requested.connect(self.client.unload)
        panel.budget_changed.connect(self.on_model_panel_budget_changed)
        panel.precision_changed.connect(self.on_model_panel_precision_changed)
        self.model_status.loaded_changed.connect(self.on_model_status_loaded_changed)
        self.conversation.answer_finished.connect(lambda _i: chat.count_context(composer.text()))
        self.conversation.reset.connect(lambda: chat.count_context(composer.text()))
        QGuiApplication.styleHints().colorSchemeChanged.connect(self.on_color_scheme_changed)

    # ------------------------------------------------------------------ start-up
    def start(self, model_dir: Path | None = None, demo: bool = False) -> None:
        """After the window shows: load `model_dir`, the demo, or what was used last time."""
        if demo or (model_dir is None and self.settings.use_demo):
            self.load_demo()
        elif model_dir is not None or self.settings.model_dir:
            self.load_model(model_dir or Path(self.settings.model_dir))

    def load_model(self, model_dir: Path) -> None:
        self.model_panel.folder_edit.setText(str(model_dir))
        self.model_panel.folder_edit.setCursorPosition(0)
        self._save_settings(replace(self.settings, model_dir=str(model_dir), use_demo=False))
        self.client.load(
            model_dir,
            gpu_budget_bytes=self.model_panel.budget_bytes(),
            context_length=self.model_panel.context_length(),
            host_format=self.model_panel.host_format(),
            snapshot_dir=snapshot_dir_for(self.data_dir),
        )

    @Slot()
    def load_demo(self) -> None:
        # 8-bit experts whatever the panel says: the demo's tiny ones cannot be 4-bit.
        self._save_settings(replace(self.settings, use_demo=True))
        self.client.load(
            self.data_dir / "demo-model",
            create_demo=True,
            context_length=self.model_panel.context_length(),
            snapshot_dir=snapshot_dir_for(self.data_dir),
        )

    def add_files(self, paths: list[Path]) -> None:
        self.attacher.add_paths(Path(str(p)) for p in paths)

    def refresh_conversations(self, *_args: object) -> None:
        rows = self.store.conversations(self.sidebar.search.text())
        self.sidebar.set_rows(rows, self.conversation.conversation_id)

    def export_conversation(self, conversation_id: str) -> None:
        row = self.store.conversation(conversation_id)
        if row is None:
            return
        name, _ = QFileDialog.getSaveFileName(
            self, "Export conversation", f"{row.title[:40]}.md", "Markdown (*.md)"
        )
        if name:
            try:
                atomic_write_text(Path(name), self.store.export_markdown(conversation_id))
            except OSError as exc:
                QMessageBox.warning(
                    self, "Export failed", f"Could not write {name}: {exc}. Choose another folder."
                )

    def _save_settings(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self.settings_file.save(settings)
        except AppError as exc:
            self.composer.show_message(exc.user_message)

    # ------------------------------------------------------------------ slots
    @Slot()
    def on_new_action_triggered(self) -> None:
        self.chat.new_conversation()
        self.composer.edit.setFocus()

    @Slot()
    def on_find_action_triggered(self) -> None:
        self.sidebar.search.setFocus()
        self.sidebar.search.selectAll()

    @Slot()
    def on_attach_action_triggered(self) -> None:
        names, _ = QFileDialog.getOpenFileNames(self, "Attach files", "", FILE_FILTER)
        self.add_files([Path(name) for name in names])

    @Slot()
    def on_export_action_triggered(self) -> None:
        if self.conversation.conversation_id:
            self.export_conversation(self.conversation.conversation_id)

    @Slot()
    def on_settings_action_triggered(self) -> None:
        dialog = SettingsDialog(self.settings, self.guard, self)
        if dialog.exec():
            self._save_settings(dialog.result_settings())
            app = QApplication.instance()
            if isinstance(app, QApplication):
                apply_theme(app, self.settings.theme, self.settings.font_size)

    @Slot()
    def on_color_scheme_changed(self) -> None:
        app = QApplication.instance()
        if self.settings.theme == "system" and isinstance(app, QApplication):
            apply_theme(app, "system", self.settings.font_size)

    @Slot()
    def on_privacy_action_triggered(self) -> None:
        dialog = SettingsDialog(self.settings, self.guard, self)
        dialog.tabs.setCurrentIndex(dialog.tabs.count() - 1)
        if dialog.exec():
            self._save_settings(dialog.result_settings())

    @Slot()
    def on_shortcuts_action_triggered(self) -> None:
        ShortcutsDialog(self).exec()

    @Slot(str)
    def on_composer_send_requested(self, text: str) -> None:
        index = self.composer.editing_index
        if index < 0 and self.dialogs.intercept_send(text):
            return  # too long: the budget dialog sends once the user has narrowed it
        self._send_draft(text)

    def _send_draft(self, text: str) -> None:
        index = self.composer.editing_index
        sent = self.chat.edit_and_resend(index, text) if index >= 0 else self.chat.send(text)
        if sent:
            self.composer.end_edit()
            self.composer.edit.clear()

    @Slot(int)
    def on_chat_view_edit_requested(self, index: int) -> None:
        if not self.conversation.is_busy:
            self.composer.begin_edit(index, self.conversation.turns[index].content)

    @Slot()
    def on_banner_choose_requested(self) -> None:
        self.model_dock.show()
        self.model_panel.on_browse_button_clicked()

    @Slot(Path)
    def on_model_panel_plan_requested(self, model_dir: Path) -> None:
        p = self.model_panel
        self.client.plan(model_dir, p.budget_bytes(), p.context_length(), p.host_format())

    @Slot(float, int)
    def on_model_panel_budget_changed(self, budget_gb: float, context_length: int) -> None:
        self._save_settings(
            replace(self.settings, gpu_budget_gb=budget_gb, context_length=context_length)
        )

    @Slot(str)
    def on_model_panel_precision_changed(self, host_format: str) -> None:
        self._save_settings(replace(self.settings, host_format=host_format))
        if self.model_panel.folder_edit.text().strip():  # show what the new format would do
            self.on_model_panel_plan_requested(self.model_panel.folder())

    @Slot()
    def on_model_status_loaded_changed(self) -> None:
        loaded = self.model_status.loaded
        if loaded is not None:
            log.info("model loaded: %s (%s)", loaded.model_name, loaded.device_summary)
            self._resource_timer.start()
            self.chat.count_context(self.composer.text())
        else:
            self._resource_timer.stop()

    @Slot()
    def on_resource_timer_timeout(self) -> None:
        if self.model_status.is_loaded and self.model_status.state == "idle":
            self.client.query_resources()

    # ------------------------------------------------------------------ drag and drop, close
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 (Qt override)
        if local_paths(event.mimeData()):
            event.acceptProposedAction()
            self.drop_overlay.show_over(self)

    def dragLeaveEvent(self, event: QDragLeaveEvent) -> None:  # noqa: N802 (Qt override)
        self.drop_overlay.hide()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 (Qt override)
        self.drop_overlay.hide()
        paths = local_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.add_files(paths)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt override)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the answer, stop the engine thread, close the database (idempotent)."""
        self._resource_timer.stop()
        self.chat.stop()
        self.client.close()
        self.store.close()

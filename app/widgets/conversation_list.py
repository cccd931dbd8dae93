"""The sidebar: search, new chat, the conversation list, rename/delete/export, undo bar."""

from __future__ import annotations

from PySide6.QtCore import QPoint, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListView,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.models.conversation_model import ID_ROLE, ConversationModel
from app.store import ConversationRow

UNDO_SECONDS = 10


class ConversationList(QWidget):
    """Emits user intents; the main window applies them and calls `set_rows`."""

    selected = Signal(str)
    new_requested = Signal()
    rename_requested = Signal(str, str)
    delete_requested = Signal(str)
    undo_requested = Signal(str)
    export_requested = Signal(str)
    search_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("sidebar")
        self.model = ConversationModel(self)
        self.search = QLineEdit(self, placeholderText="Search conversations (Ctrl+F)")
        self.search.setAccessibleName("Search conversations")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.search_changed)
        self.new_button = QPushButton("New chat", self)
        self.new_button.setAccessibleName("New chat (Ctrl+N)")
        self.new_button.clicked.connect(self.new_requested)
        self.view = QListView(self)
        self.view.setModel(self.model)
        self.view.setAccessibleName("Conversations")
        self.view.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.view.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.view.setUniformItemSizes(True)
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground)  # lets the QSS colour it
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self.on_view_context_menu_requested)
        self.view.activated.connect(lambda index: self.selected.emit(index.data(ID_ROLE)))
        self.view.clicked.connect(lambda index: self.selected.emit(index.data(ID_ROLE)))
        self._build_undo_bar()
        self._add_key_actions()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.addWidget(self.new_button)
        layout.addWidget(self.search)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.undo_bar)

    def _build_undo_bar(self) -> None:
        self.undo_bar = QWidget(self)
        self.undo_label = QLabel("Conversation deleted.", self.undo_bar)
        self.undo_button = QPushButton("Undo", self.undo_bar)
        self.undo_button.setAccessibleName("Undo delete")
        self.undo_button.clicked.connect(self.on_undo_button_clicked)
        row = QHBoxLayout(self.undo_bar)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.undo_label, 1)
        row.addWidget(self.undo_button)
        self.undo_bar.hide()
        self._undo_id = ""
        self._undo_timer = QTimer(self, singleShot=True, interval=UNDO_SECONDS * 1000)
        self._undo_timer.timeout.connect(self.undo_bar.hide)

    def _add_key_actions(self) -> None:
        rename = QAction("Rename", self.view, shortcut=QKeySequence(Qt.Key.Key_F2))
        rename.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)
        rename.triggered.connect(lambda: self.ask_rename(self.current_id()))
        delete = QAction(
            "Delete", self.view, shortcut=QKeySequence(QKeySequence.StandardKey.Delete)
        )
        delete.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)
        delete.triggered.connect(lambda: self.delete(self.current_id()))
        self.view.addActions([rename, delete])

    # ------------------------------------------------------------------ API
    def set_rows(self, rows: list[ConversationRow], current_id: str = "") -> None:
        self.model.set_rows(rows)
        self.select_id(current_id)

    def select_id(self, conversation_id: str) -> None:
        row = self.model.row_of(conversation_id)
        if row >= 0:
            self.view.setCurrentIndex(self.model.index(row))
        else:
            self.view.clearSelection()

    def current_id(self) -> str:
        index = self.view.currentIndex()
        return str(index.data(ID_ROLE)) if index.isValid() else ""

    def ask_rename(self, conversation_id: str) -> None:
        row = self.model.row_of(conversation_id)
        if row < 0:
            return
        title, ok = QInputDialog.getText(
            self, "Rename conversation", "Title:", text=self.model.rows[row].title
        )
        if ok and title.strip():
            self.rename_requested.emit(conversation_id, title.strip())

    def delete(self, conversation_id: str) -> None:
        if not conversation_id:
            return
        self._undo_id = conversation_id
        self.delete_requested.emit(conversation_id)
        self.undo_bar.show()
        self._undo_timer.start()

    # ------------------------------------------------------------------ slots
    @Slot()
    def on_undo_button_clicked(self) -> None:
        if self._undo_id:
            self.undo_requested.emit(self._undo_id)
        self._undo_id = ""
        self.undo_bar.hide()

    @Slot(QPoint)
    def on_view_context_menu_requested(self, point: QPoint) -> None:
        index = self.view.indexAt(point)
        if not index.isValid():
            return
        conversation_id = str(index.data(ID_ROLE))
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self.ask_rename(conversation_id))
        menu.addAction("Export as Markdown…", lambda: self.export_requested.emit(conversation_id))
        menu.addAction("Delete", lambda: self.delete(conversation_id))
        menu.exec(self.view.viewport().mapToGlobal(point))

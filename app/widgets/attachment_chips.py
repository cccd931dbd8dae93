"""Chips for the files waiting to be sent: name, size, pages/tokens, thumbnail, remove."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal, Slot
from PySide6.QtGui import QImageReader, QPixmap
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QStyle, QToolButton, QWidget

from app.state import Attachment, AttachmentList
from app.widgets.message_view import format_bytes

THUMBNAIL_PX = 36
NOTE_ICON_PX = 16  # the info icon of a note (a scanned PDF: pages read as images, their cost)


def chip_details(item: Attachment) -> str:
    parts = [format_bytes(item.num_bytes)]
    if item.error:
        return "cannot be read"
    if not item.is_read:
        parts.append("reading…")
    else:
        if item.kind == "document" and item.num_pages:
            parts.append(f"{item.num_pages} page{'s' if item.num_pages != 1 else ''}")
        if item.num_tokens:
            parts.append(f"{item.num_tokens:,} tokens")
        if item.note and "scanned" in item.note.lower():
            parts.append("scanned")
    return " · ".join(parts)


def thumbnail(path: Path) -> QPixmap:
    reader = QImageReader(str(path))
    reader.setAutoTransform(True)
    size = reader.size()
    if size.isValid():
        reader.setScaledSize(
            size.scaled(QSize(THUMBNAIL_PX, THUMBNAIL_PX), Qt.AspectRatioMode.KeepAspectRatio)
        )
    return QPixmap.fromImage(reader.read())


class AttachmentChip(QFrame):
    remove_requested = Signal(Path)

    def __init__(self, item: Attachment, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.item = item
        self.setObjectName("chipError" if item.error else "chip")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 3, 3, 3)
        if item.kind == "image":
            self.thumbnail = QLabel(self)
            self.thumbnail.setPixmap(thumbnail(item.path))
            layout.addWidget(self.thumbnail)
        self.name_label = QLabel(f"<b>{item.path.name}</b><br>{chip_details(item)}", self)
        self.name_label.setToolTip(item.error or item.note or str(item.path))
        layout.addWidget(self.name_label)
        self.note_icon = QLabel(self)
        info = self.style().standardIcon(QStyle.StandardPixmap.SP_MessageBoxInformation)
        self.note_icon.setPixmap(info.pixmap(NOTE_ICON_PX, NOTE_ICON_PX))
        self.note_icon.setObjectName("chipNote")
        self.note_icon.setToolTip(item.note)
        self.note_icon.setAccessibleName(f"Note on {item.path.name}: {item.note}")
        self.note_icon.setVisible(bool(item.note) and not item.error)
        layout.addWidget(self.note_icon)
        self.remove_button = QToolButton(self)
        self.remove_button.setText("✕")
        self.remove_button.setAccessibleName(f"Remove {item.path.name}")
        self.remove_button.setToolTip(f"Remove {item.path.name}")
        self.remove_button.clicked.connect(lambda: self.remove_requested.emit(item.path))
        layout.addWidget(self.remove_button)
        self.setAccessibleName(f"Attachment {item.path.name}, {chip_details(item)}")


class AttachmentChips(QWidget):
    """A row of chips that follows the `AttachmentList`."""

    def __init__(self, attachments: AttachmentList, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.attachments = attachments
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addStretch(1)
        self.chips: list[AttachmentChip] = []
        attachments.changed.connect(self.on_attachments_changed)
        self.on_attachments_changed()

    @Slot()
    def on_attachments_changed(self) -> None:
        for chip in self.chips:
            self._layout.removeWidget(chip)
            chip.deleteLater()
        self.chips = []
        for item in self.attachments.items:
            chip = AttachmentChip(item, self)
            chip.remove_requested.connect(self.attachments.remove)
            self._layout.insertWidget(self._layout.count() - 1, chip)
            self.chips.append(chip)
        self.setVisible(bool(self.chips))

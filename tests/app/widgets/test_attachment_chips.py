"""Chips: details text, thumbnails, remove buttons with accessible names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.state import Attachment, AttachmentList
from app.widgets.attachment_chips import THUMBNAIL_PX, AttachmentChips, chip_details
from tests.app.helpers import make_image


def test_chip_details_text() -> None:
    item = Attachment(
        Path("r.pdf"), "document", num_bytes=2048, num_pages=3, num_tokens=1500, is_read=True
    )
    assert chip_details(item) == "2.0 KB · 3 pages · 1,500 tokens"
    assert chip_details(Attachment(Path("x.png"), "image", 10)) == "10 B · reading…"
    assert chip_details(Attachment(Path("y.pdf"), "document", 10, error="bad")) == "cannot be read"


def test_chips_follow_the_list(qtbot: Any, tmp_path: Path) -> None:
    items = AttachmentList()
    chips = AttachmentChips(items)
    qtbot.add_widget(chips)
    assert chips.isHidden()
    image = make_image(tmp_path / "wide.png", 400, 100)
    items.add(Attachment(image, "image", 100))
    items.add(Attachment(tmp_path / "n.txt", "document", 5))
    assert len(chips.chips) == 2 and not chips.isHidden()
    pixmap = chips.chips[0].thumbnail.pixmap()
    assert (pixmap.width(), pixmap.height()) == (THUMBNAIL_PX, THUMBNAIL_PX // 4)
    assert chips.chips[1].remove_button.accessibleName() == "Remove n.txt"
    chips.chips[1].remove_button.click()
    assert [i.path.name for i in items.items] == ["wide.png"]


def test_scanned_note_shows_an_info_icon(qtbot: Any) -> None:
    note = "Pages 1, 2 of scan.pdf have no text layer (scanned). About 1,200 tokens per page."
    items = AttachmentList()
    chips = AttachmentChips(items)
    qtbot.add_widget(chips)
    items.add(Attachment(Path("scan.pdf"), "document", 10, 2, 2400, note=note, is_read=True))
    items.add(Attachment(Path("plain.pdf"), "document", 10, 2, 90, is_read=True))
    scanned, plain = chips.chips
    assert not scanned.note_icon.isHidden() and scanned.note_icon.toolTip() == note
    assert "scanned" in scanned.name_label.text() and "2,400 tokens" in scanned.name_label.text()
    assert plain.note_icon.isHidden()

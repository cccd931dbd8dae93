"""The over-budget dialog: rows with pages and tokens, live total, Send only when it fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.state import Attachment
from app.widgets.budget_dialog import BudgetDialog, item_tokens, other_parts
from engine import api

REPORT = Attachment(Path("/d/report.pdf"), "document", num_pages=120, is_read=True)
SCAN = Attachment(Path("/d/scan.pdf"), "document", num_pages=2, is_read=True)
PHOTO = Attachment(Path("/d/photo.png"), "image", is_read=True)


def count(report: int, fits: bool = False, limit: int = 32768) -> api.TokenCount:
    parts = (
        api.TokenCountPart("system prompt", 300),
        api.TokenCountPart("document report.pdf", report),
        api.TokenCountPart("document scan.pdf", 10),
        api.TokenCountPart("image scan.pdf p. 1", 1200),
        api.TokenCountPart("image scan.pdf p. 2", 1200),
        api.TokenCountPart("image photo.png", 800),
        api.TokenCountPart("conversation", 50),
        api.TokenCountPart("answer reserve", 1024),
    )
    return api.TokenCount("r1", sum(p.num_tokens for p in parts), limit, parts, fits)


def test_item_tokens_include_scanned_pages() -> None:
    c = count(40000)
    assert item_tokens(c, REPORT) == 40000
    assert item_tokens(c, SCAN) == 2410
    assert item_tokens(c, PHOTO) == 800
    assert other_parts(c, [REPORT, SCAN, PHOTO]) == [
        ("system prompt", 300),
        ("conversation", 50),
        ("answer reserve", 1024),
    ]


def test_a_same_named_file_of_an_earlier_message_is_not_counted_twice() -> None:
    parts = (
        api.TokenCountPart("document report.pdf", 7000),  # attached to an earlier message
        api.TokenCountPart("conversation", 50),
        api.TokenCountPart("document report.pdf", 9000),
        api.TokenCountPart("answer reserve", 1024),
    )
    c = api.TokenCount("r", 17074, 16000, parts, False)
    assert item_tokens(c, REPORT) == 9000
    assert other_parts(c, [REPORT]) == [
        ("document report.pdf", 7000),
        ("conversation", 50),
        ("answer reserve", 1024),
    ]


def test_dialog_lists_files_and_blocks_send(qtbot: Any) -> None:
    dialog = BudgetDialog([REPORT, SCAN, PHOTO], count(40000))
    qtbot.add_widget(dialog)
    assert [r.include.text() for r in dialog.rows] == ["report.pdf", "scan.pdf", "photo.png"]
    assert [r.tokens.text() for r in dialog.rows] == ["40,000", "2,410", "800"]
    assert dialog.rows[0].pages.placeholderText() == "all pages of 120"
    assert not dialog.rows[2].pages.isEnabled()
    assert "32,768" in dialog.total_label.text() and "too many" in dialog.total_label.text()
    assert "system prompt: 300" in dialog.others_label.text()
    assert not dialog.send_button.isEnabled()


def test_editing_pages_recounts_then_send_enables(qtbot: Any) -> None:
    dialog = BudgetDialog([REPORT, PHOTO], count(40000))
    qtbot.add_widget(dialog)
    qtbot.keyClicks(dialog.rows[0].pages, "1-40, 52")
    with qtbot.wait_signal(dialog.recount_requested) as blocker:
        pass
    [report, photo] = blocker.args[0]
    assert report.pages == "1-40,52" and photo.pages == ""
    assert not dialog.send_button.isEnabled()
    dialog.set_count(count(12000, fits=True))
    assert dialog.send_button.isEnabled()
    assert dialog.rows[0].tokens.text() == "12,000" and "fits" in dialog.total_label.text()


def test_unchecked_files_are_left_out(qtbot: Any) -> None:
    dialog = BudgetDialog([REPORT, PHOTO], count(40000))
    qtbot.add_widget(dialog)
    with qtbot.wait_signal(dialog.recount_requested) as blocker:
        dialog.rows[0].include.click()
    assert [i.path.name for i in blocker.args[0]] == ["photo.png"]
    assert [i.path.name for i in dialog.chosen_items()] == ["photo.png"]


def test_bad_range_is_refused_without_a_count(qtbot: Any) -> None:
    dialog = BudgetDialog([REPORT], count(40000))
    qtbot.add_widget(dialog)
    qtbot.keyClicks(dialog.rows[0].pages, "5-")
    with qtbot.assert_not_emitted(dialog.recount_requested, wait=400):
        pass
    assert "1-40" in dialog.total_label.text()
    assert not dialog.send_button.isEnabled()
    dialog.set_error("report.pdf has pages 1-120; '130' is outside that range.")
    assert "outside" in dialog.total_label.text()

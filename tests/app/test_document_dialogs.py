"""Documents through the window (fake engine): citation chips that open the cited page,
citations that survive a restart and reach the export, and the over-budget dialog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt

from app.widgets.page_view import PdfPageDialog, TextPageDialog
from engine import api
from tests.app.fake_engine import FakeEngine, Script
from tests.app.helpers import TIMEOUT_MS, drop, load, make_pdf, send, wait_answer

PAGES = ["Summary. We plan a launch.", "Costs. The budget is 12,000 euros in 2026."]
NOTES = "# Notes\n\nThe launch is on Friday.\n"


def checks(pdf: Path, notes: Path) -> tuple[api.CitationCheck, ...]:
    start = NOTES.index("launch is on Friday")
    return (
        api.CitationCheck(
            '[p. 2: "budget is 12,000"]', pdf, 2, "budget is 12,000", True, "exact", 12, 28
        ),
        api.CitationCheck(
            '[p. 1: "launch is on Friday"]',
            notes,
            1,
            "launch is on Friday",
            True,
            "exact",
            start,
            start + 19,
        ),
        api.CitationCheck('[p. 2: "one million"]', pdf, 2, "one million", False, "not_found"),
    )


def ask_with_documents(qtbot: Any, make_window: Any, tmp_path: Path, **kwargs: Any) -> Any:
    pdf = make_pdf(tmp_path / "plan.pdf", PAGES)
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES)
    script = Script(citations=checks(pdf, notes), page_texts={1: NOTES}, num_doc_pages=2)
    window = make_window(script=script, **kwargs)
    load(qtbot, window)
    drop(window, [pdf, notes])
    qtbot.waitUntil(lambda: all(a.is_read for a in window.attachments.items), timeout=TIMEOUT_MS)
    send(qtbot, window, "What is the budget?")
    wait_answer(qtbot, window)
    return window


def test_citations_become_chips_under_the_answer(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    window = ask_with_documents(qtbot, make_window, tmp_path)
    chips = window.chat_view.views[1].citation_chips
    assert [c.text() for c in chips.chips] == [
        "✓ plan.pdf p. 2",
        "✓ notes.md p. 1",
        "⚠ plan.pdf p. 2",
    ]
    assert chips.isVisible()
    assert "not found" in chips.chips[2].toolTip()
    assert not window.chat_view.views[0].citation_chips.isVisible()


def test_pdf_chip_opens_the_pdf_page_with_the_quote(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    window = ask_with_documents(qtbot, make_window, tmp_path)
    qtbot.mouseClick(window.chat_view.views[1].citation_chips.chips[0], Qt.MouseButton.LeftButton)
    dialog = window.dialogs.page_dialog
    assert isinstance(dialog, PdfPageDialog) and dialog.isVisible()
    qtbot.waitUntil(lambda: dialog.view.currentSearchResultIndex() >= 0, timeout=TIMEOUT_MS)
    assert dialog.search.resultAtIndex(dialog.view.currentSearchResultIndex()).page() == 1
    assert dialog.highlighted_result() == "budget is 12,000"


def test_text_chip_reads_the_page_and_highlights_the_quote(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    created: list[FakeEngine] = []
    window = ask_with_documents(qtbot, make_window, tmp_path, created=created)
    window.chat_view.views[1].citation_chips.chips[1].click()
    qtbot.waitUntil(
        lambda: isinstance(window.dialogs.page_dialog, TextPageDialog), timeout=TIMEOUT_MS
    )
    dialog = window.dialogs.page_dialog
    assert dialog.highlighted_text() == "launch is on Friday"
    [read] = [r for r in created[0].submitted if isinstance(r, api.ReadPage)]
    assert (read.path.name, read.page) == ("notes.md", 1)


def test_citations_survive_a_restart_and_reach_the_export(
    qtbot: Any, make_window: Any, tmp_path: Path, data_dir: Path
) -> None:
    window = ask_with_documents(qtbot, make_window, tmp_path)
    conversation_id = window.conversation.conversation_id
    window.shutdown()
    again = make_window(directory=data_dir)
    again.chat.open_conversation(conversation_id)
    chips = again.chat_view.views[1].citation_chips.chips
    assert [c.text() for c in chips] == ["✓ plan.pdf p. 2", "✓ notes.md p. 1", "⚠ plan.pdf p. 2"]
    assert again.conversation.turns[1].citations[1].span_start == NOTES.index("launch")
    exported = again.store.export_markdown(conversation_id)
    assert "- plan.pdf, p. 2: “budget is 12,000” (✅ verified: exact)" in exported
    assert "- plan.pdf, p. 2: “one million” (⚠️ not verified: not found)" in exported


def test_a_moved_document_says_so_instead_of_opening(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    window = ask_with_documents(qtbot, make_window, tmp_path)
    (tmp_path / "plan.pdf").unlink()
    window.chat_view.views[1].citation_chips.chips[0].click()
    assert window.dialogs.page_dialog is None
    assert "no longer there" in window.composer.message_label.text()


def test_over_budget_opens_the_dialog_and_sends_chosen_pages(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    created: list[FakeEngine] = []
    script = Script(num_doc_pages=50, page_tokens=100, context_length=4096)
    window = make_window(script=script, created=created)
    load(qtbot, window)
    report = tmp_path / "report.txt"
    report.write_text("long\n" * 100)
    drop(window, [report])
    qtbot.waitUntil(
        lambda: window.metrics.context is not None and not window.metrics.context.fits,
        timeout=TIMEOUT_MS,
    )
    send(qtbot, window, "Summarise")
    dialog = window.dialogs.budget_dialog
    assert dialog is not None and dialog.isVisible()
    assert not any(isinstance(r, api.Ask) for r in created[0].submitted)  # nothing sent
    row = dialog.rows[0]
    assert row.tokens.text() == "5,000" and "4,096" in dialog.total_label.text()
    assert not dialog.send_button.isEnabled()
    qtbot.keyClicks(row.pages, "1-20")
    qtbot.waitUntil(lambda: dialog.send_button.isEnabled(), timeout=TIMEOUT_MS)
    assert row.tokens.text() == "2,000" and "fits" in dialog.total_label.text()
    qtbot.mouseClick(dialog.send_button, Qt.MouseButton.LeftButton)
    wait_answer(qtbot, window)
    [ask] = [r for r in created[0].submitted if isinstance(r, api.Ask)]
    assert ask.messages[-1].documents == (report,)
    assert ask.messages[-1].document_pages == ("1-20",)
    assert window.composer.text() == ""
    stored = window.store.messages(window.conversation.conversation_id)[0]
    assert stored.attachments[0]["pages"] == "1-20"


def test_over_budget_dialog_can_drop_a_file(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    created: list[FakeEngine] = []
    window = make_window(script=Script(num_doc_pages=50, page_tokens=100), created=created)
    load(qtbot, window)
    report = tmp_path / "report.txt"
    report.write_text("long\n")
    drop(window, [report])
    qtbot.waitUntil(
        lambda: window.metrics.context is not None and not window.metrics.context.fits,
        timeout=TIMEOUT_MS,
    )
    send(qtbot, window, "Hello anyway")
    dialog = window.dialogs.budget_dialog
    dialog.rows[0].include.click()
    qtbot.waitUntil(lambda: dialog.send_button.isEnabled(), timeout=TIMEOUT_MS)
    dialog.send_button.click()
    wait_answer(qtbot, window)
    [ask] = [r for r in created[0].submitted if isinstance(r, api.Ask)]
    assert ask.messages[-1].documents == ()


def test_cancel_keeps_the_draft_and_the_files(qtbot: Any, make_window: Any, tmp_path: Path) -> None:
    window = make_window(script=Script(num_doc_pages=50, page_tokens=100))
    load(qtbot, window)
    report = tmp_path / "report.txt"
    report.write_text("long\n")
    drop(window, [report])
    qtbot.waitUntil(
        lambda: window.metrics.context is not None and not window.metrics.context.fits,
        timeout=TIMEOUT_MS,
    )
    send(qtbot, window, "Keep me")
    window.dialogs.budget_dialog.reject()
    assert window.dialogs.budget_dialog is None
    assert window.composer.text() == "Keep me"
    assert [a.path for a in window.attachments.items] == [report]
    assert window.conversation.turns == []

"""The page view: a real PDF at the cited page with the quote highlighted; a text page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.citations import Citation
from app.widgets.page_view import PdfPageDialog, TextPageDialog, _search_terms
from tests.app.helpers import make_pdf

PAGES = [
    "Introduction. The project starts in March.",
    "Costs. The total budget is 12,000 euros for the first year.",
    "Risks. The budget may grow if suppliers are late.",
]


def wait_highlight(qtbot: Any, dialog: PdfPageDialog) -> None:
    qtbot.waitUntil(lambda: dialog.view.currentSearchResultIndex() >= 0, timeout=5000)


def test_pdf_opens_at_the_page_with_the_quote_highlighted(qtbot: Any, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "plan.pdf", PAGES)
    citation = Citation("c", pdf, 3, "budget may grow", True, "exact", 7, 22)
    dialog = PdfPageDialog(citation)
    qtbot.add_widget(dialog)
    dialog.show()
    wait_highlight(qtbot, dialog)
    link = dialog.search.resultAtIndex(dialog.view.currentSearchResultIndex())
    assert link.page() == 2  # page 3, counted from 0
    assert dialog.page_index == 2
    assert dialog.highlighted_result() == "budget may grow"
    assert "page 3" in dialog.windowTitle() and "Verified" in dialog.summary.text()


def test_pdf_highlight_picks_the_cited_page_among_matches(qtbot: Any, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "plan.pdf", PAGES)
    dialog = PdfPageDialog(Citation("c", pdf, 2, "budget", True, "exact", 20, 26))
    qtbot.add_widget(dialog)
    wait_highlight(qtbot, dialog)
    assert dialog.search.resultAtIndex(dialog.view.currentSearchResultIndex()).page() == 1


def test_pdf_fuzzy_quote_falls_back_to_its_first_words(qtbot: Any, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "plan.pdf", PAGES)
    quote = "The total budget is 12,000 euros for the first two years"
    dialog = PdfPageDialog(Citation("c", pdf, 2, quote, True, "fuzzy", 7, 50))
    qtbot.add_widget(dialog)
    wait_highlight(qtbot, dialog)
    assert dialog.highlighted_result() == "The total budget is 12,000 euros"


def test_search_terms() -> None:
    assert _search_terms('  "a  b c" ') == ["a b c"]
    assert _search_terms("one two three four five six seven") == [
        "one two three four five six seven",
        "one two three four five six",
    ]
    assert _search_terms("") == []


def test_text_page_highlights_the_span(qtbot: Any) -> None:
    text = "# Notes\n\nThe launch is on Friday.\nBring snacks."
    start = text.index("launch is on Friday")
    citation = Citation(
        "c", Path("notes.md"), 1, "launch is on Friday", True, "exact", start, start + 19
    )
    dialog = TextPageDialog(citation, "p. 1", text)
    qtbot.add_widget(dialog)
    assert dialog.highlighted_text() == "launch is on Friday"
    assert dialog.windowTitle() == "notes.md, p. 1"
    assert dialog.text_view.toPlainText() == text


def test_text_page_without_a_span_highlights_nothing(qtbot: Any) -> None:
    citation = Citation("c", Path("n.txt"), 1, "absent", False, "not_found")
    dialog = TextPageDialog(citation, "p. 1", "some text")
    qtbot.add_widget(dialog)
    assert dialog.highlighted_text() == ""
    assert "Not verified" in dialog.summary.text()

"""Citations: labels, tooltips, storage round trip and Markdown lines."""

from __future__ import annotations

from pathlib import Path

from app.citations import (
    Citation,
    chip_label,
    chip_tooltip,
    citations_markdown,
    cites_several_documents,
    status_text,
)

GOOD = Citation(
    '[p. 2: "budget is 12,000"]', Path("/d/r.pdf"), 2, "budget is 12,000", True, "exact", 10, 26
)
BAD = Citation('[p. 9: "moon"]', None, 9, "moon", False, "no_page")


def test_round_trip_through_a_dict() -> None:
    assert Citation.from_dict(GOOD.to_dict()) == GOOD
    assert Citation.from_dict(BAD.to_dict()) == BAD
    assert GOOD.has_span and not BAD.has_span


def test_labels_name_the_document_only_when_several_are_cited() -> None:
    other = Citation("x", Path("/d/notes.md"), 1, "q", True, "fuzzy")
    assert chip_label(GOOD, False) == "p. 2"
    assert chip_label(GOOD, True) == "r.pdf p. 2"
    assert not cites_several_documents([GOOD, GOOD, BAD])
    assert cites_several_documents([GOOD, other])


def test_tooltip_says_the_status_in_plain_words_and_the_quote() -> None:
    tip = chip_tooltip(GOOD)
    assert tip.startswith("Verified: the quote appears word for word")
    assert "“budget is 12,000”" in tip and "r.pdf, page 2" in tip
    assert status_text("not_found").startswith("Not verified")
    assert "odd" in status_text("odd")


def test_markdown_keeps_page_quote_and_verdict() -> None:
    lines = citations_markdown([GOOD, BAD])
    assert lines[0] == "**Citations**"
    assert "- r.pdf, p. 2: “budget is 12,000” (✅ verified: exact)" in lines
    assert "- p. 9: “moon” (⚠️ not verified: no page)" in lines
    assert citations_markdown([]) == []

"""Citation chips: one per cited page, marked verified or not, clickable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.citations import Citation
from app.widgets.citation_chips import CitationChips

GOOD = Citation("a", Path("/d/r.pdf"), 2, "budget is 12,000", True, "exact", 0, 16)
FUZZY_TWICE = Citation("b", Path("/d/r.pdf"), 3, "roughly", False, "not_found")
OTHER_DOC = Citation("c", Path("/d/notes.md"), 1, "launch", True, "fuzzy", 0, 6)


def test_chips_show_pages_and_verdicts(qtbot: Any) -> None:
    chips = CitationChips()
    qtbot.add_widget(chips)
    assert chips.isHidden()
    chips.set_citations([GOOD, FUZZY_TWICE, FUZZY_TWICE])
    assert [c.text() for c in chips.chips] == ["✓ p. 2", "⚠ p. 3"]
    assert [c.objectName() for c in chips.chips] == ["citationVerified", "citationUnverified"]
    assert "not found" in chips.chips[1].toolTip() and "“roughly”" in chips.chips[1].toolTip()
    assert not chips.isHidden()


def test_several_documents_are_named(qtbot: Any) -> None:
    chips = CitationChips()
    qtbot.add_widget(chips)
    chips.set_citations([GOOD, OTHER_DOC])
    assert [c.text() for c in chips.chips] == ["✓ r.pdf p. 2", "✓ notes.md p. 1"]


def test_click_asks_to_open_the_page(qtbot: Any) -> None:
    chips = CitationChips()
    qtbot.add_widget(chips)
    chips.set_citations([GOOD, OTHER_DOC])
    with qtbot.wait_signal(chips.open_requested) as blocker:
        chips.chips[1].click()
    assert blocker.args == [OTHER_DOC]


def test_a_citation_without_a_document_cannot_be_opened(qtbot: Any) -> None:
    chips = CitationChips()
    qtbot.add_widget(chips)
    chips.set_citations([Citation("x", None, 7, "q", False, "no_page")])
    assert not chips.chips[0].isEnabled()

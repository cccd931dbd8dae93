"""Fetching a cited page's text: through the real engine for a Markdown file, and failures."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from app.citations import Citation
from app.engine_client import EngineClient, real_engine, to_citation
from app.pages import PageController, opens_as_pdf
from app.state import ModelStatus
from app.widgets.page_view import TextPageDialog
from engine.answering import check_citations
from tests.app.fake_engine import fake_factory

NOTES = "# Notes\n\nThe launch is on Friday.\n"
PAGE_TIMEOUT_MS = 60_000  # the real engine thread starts on the first request


def test_which_citations_open_as_pdf() -> None:
    assert opens_as_pdf(Citation("c", Path("a.PDF"), 1, "", True, "exact"))
    assert not opens_as_pdf(Citation("c", Path("a.md"), 1, "", True, "exact"))
    assert not opens_as_pdf(Citation("c", None, 1, "", False, "no_page"))


def test_problems_are_named(tmp_path: Path) -> None:
    pages = PageController(EngineClient(ModelStatus(), fake_factory()))
    assert "page 4" in pages.problem(Citation("c", None, 4, "", False, "no_page"))
    gone = Citation("c", tmp_path / "gone.md", 1, "", True, "exact")
    assert "no longer there" in pages.problem(gone)
    (tmp_path / "here.md").write_text("x")
    assert pages.problem(Citation("c", tmp_path / "here.md", 1, "", True, "exact")) == ""


def test_real_engine_reads_a_markdown_page(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES)
    # The engine's own check of an answer's citation gives the span to highlight.
    [check] = check_citations('It is Friday [p. 1: "launch is on Friday"].', [notes])
    citation = to_citation(check)
    assert citation.verified and citation.has_span
    client = EngineClient(ModelStatus(), real_engine)
    pages = PageController(client)
    try:
        with qtbot.wait_signal(pages.page_ready, timeout=PAGE_TIMEOUT_MS) as blocker:
            pages.fetch(citation)
        cited, label, text = blocker.args
        assert cited == citation and label
        dialog = TextPageDialog(cited, label, text)
        qtbot.add_widget(dialog)
        assert dialog.highlighted_text() == "launch is on Friday"
        with qtbot.wait_signal(pages.failed, timeout=PAGE_TIMEOUT_MS) as failure:
            pages.fetch(Citation("c", notes, 9, "", False, "no_page"))
        assert "page 9" in failure.args[0]
    finally:
        client.close()

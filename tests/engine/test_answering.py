"""Documents in prompts: page choice, scanned pages as images, citation checks, page text."""

from __future__ import annotations

import pytest

from engine import api
from engine.answering import check_citations, page_text, system_prompt_for
from engine.chat import ChatFormatter
from engine.documents_bridge import load_document, parse_pages
from engine.errors import InputError


def _pdf(path, pages: list[str], scanned_page: bool = False):
    from fpdf import FPDF
    from PIL import Image, ImageDraw

    pdf = FPDF()
    for text in pages:
        pdf.add_page()
        pdf.set_font("Helvetica", size=14)
        pdf.multi_cell(0, 10, text)
    if scanned_page:
        img = Image.new("RGB", (400, 300), "white")
        ImageDraw.Draw(img).text((20, 20), "SCANNED INVOICE 42", fill="black")
        pdf.add_page()
        pdf.image(img, x=10, y=10, w=150)
    pdf.output(str(path))
    return path


@pytest.fixture(scope="module")
def formatter(tiny_checkpoint):
    return ChatFormatter(tiny_checkpoint)


def test_parse_pages():
    assert parse_pages("1-3, 5", 6) == [1, 2, 3, 5]
    with pytest.raises(InputError, match="pages 1-6"):
        parse_pages("2-9", 6, "a.pdf")
    with pytest.raises(InputError, match="not a page range"):
        parse_pages("x", 6)


def test_chosen_pages_only_and_scanned_pages_become_images(formatter, tmp_path):
    pdf = _pdf(tmp_path / "r.pdf", ["Alpha page one.", "Beta page two.", "Gamma page three."], True)
    msg = api.ChatMessage("user", "Summarise.", documents=(pdf,), document_pages=("2-4",))
    prompt = formatter.build([msg], "", "none", load_document)
    text = formatter.tokenizer.decode(prompt.ids)
    assert "Beta page two" in text and "Alpha page one" not in text
    assert "[p. 4] (scanned page of r.pdf)" in text
    assert len(prompt.images) == 1 and 10 in prompt.ids
    labels = [p.label for p in prompt.parts]
    assert "document r.pdf" in labels and "image r.pdf p. 4" in labels


def test_citations_are_checked_against_the_pages(tmp_path):
    pdf = _pdf(tmp_path / "r.pdf", ["The launch is on 4 May.", "The budget is 12,000 euros."])
    answer = 'Launch: 4 May [p. 1: "The launch is on 4 May"]. Budget [p. 2: "budget is 99 euros"].'
    checks = check_citations(answer, [pdf])
    assert [(c.page, c.verified) for c in checks] == [(1, True), (2, False)]
    assert checks[0].document == pdf and checks[0].span_start >= 0
    assert checks[1].status == "not_found"


def test_page_text_and_missing_page(tmp_path):
    pdf = _pdf(tmp_path / "r.pdf", ["First.", "Second page text."])
    page = page_text(api.ReadPage("r", pdf, 2))
    assert "Second page text" in page.text and page.label
    with pytest.raises(InputError, match="no page 7"):
        page_text(api.ReadPage("r", pdf, 7))


def test_citation_rules_join_the_system_prompt_only_with_documents(tmp_path):
    plain = api.Ask("a", (api.ChatMessage("user", "hi"),), system_prompt="Be brief.")
    assert system_prompt_for(plain, "") == "Be brief."
    with_doc = api.Ask("a", (api.ChatMessage("user", "hi", documents=(tmp_path / "x.pdf",)),))
    assert "[p. 12" in system_prompt_for(with_doc, "Default.")

"""Citations: the grammar of find_citations, and verify_citations against page text."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.citations import (
    DEFAULT_CITATION_PROMPT,
    Citation,
    find_citations,
    find_in_text,
    verify_citations,
)
from engine.documents import Document, Page

PAGES = (
    "Summary\nThe quarterly report opens with a summary of revenue.",
    "Net revenue rose by 12 percent compared with the pre-\nvious year. The board\n"
    "proposes a “generous” dividend of 40 cents per share.",
    "Operating costs fell because the Lyon plant closed in March.",
)


def make_document(name: str = "report.pdf", texts: tuple[str, ...] = PAGES) -> Document:
    pages = tuple(Page(n, text, f"p. {n}") for n, text in enumerate(texts, start=1))
    return Document(Path(name), "pdf", pages)


def cite(text: str) -> list[tuple[int, int, str | None, str | None, str]]:
    return [(c.page, c.end_page, c.quote, c.document, c.unit) for c in find_citations(text)]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Revenue rose [p. 2].", [(2, 2, None, None, "page")]),
        (
            'Revenue rose [p. 2: "rose by 12 percent"].',
            [(2, 2, "rose by 12 percent", None, "page")],
        ),
        ("Revenue rose [p. 2] “rose by 12 percent”.", [(2, 2, "rose by 12 percent", None, "page")]),
        ('It "rose by 12 percent" [p.2] here.', [(2, 2, "rose by 12 percent", None, "page")]),
        ("See [pp. 2–3].", [(2, 3, None, None, "page")]),
        ('[p. 2, "rose by"]', [(2, 2, "rose by", None, "page")]),
        (
            "See [page 7] and [Pages 4 - 5].",
            [(7, 7, None, None, "page"), (4, 5, None, None, "page")],
        ),
        ("See [p. 3, 7].", [(3, 3, None, None, "page"), (7, 7, None, None, "page")]),
        ("See [section 2; p. 9].", [(2, 2, None, None, "section"), (9, 9, None, None, "page")]),
        ("See [§ 4].", [(4, 4, None, None, "section")]),
        ('[report.pdf, p. 3: "Lyon"]', [(3, 3, "Lyon", "report.pdf", "page")]),
        ("[Annual Report 2025; p. 3]", [(3, 3, None, "Annual Report 2025", "page")]),
        ('[p. 2: "the [sic] value"]', [(2, 2, "the [sic] value", None, "page")]),
        ("Footnote [1] and [link](http://x) and [p] and [page x] are not citations.", []),
    ],
)
def test_grammar(answer: str, expected: list[tuple[int, int, str | None, str | None, str]]) -> None:
    assert cite(answer) == expected


def test_each_loose_quote_serves_one_citation() -> None:
    found = find_citations('Costs "fell" [p. 3] while "revenue rose" [p. 2].')

    assert [(c.page, c.quote) for c in found] == [(3, "fell"), (2, "revenue rose")]


def test_spans_cover_marker_and_quote() -> None:
    answer = 'Revenue rose [p. 2] "rose by 12 percent" in 2025.'

    (citation,) = find_citations(answer)

    assert answer[citation.start : citation.end] == '[p. 2] "rose by 12 percent"'


def test_quote_far_from_the_marker_is_not_attached() -> None:
    (citation,) = find_citations('He said "hello" to everyone in the room [p. 1].')

    assert citation.quote is None


def verify_one(answer: str, documents: list[Document] | None = None):
    (result,) = verify_citations(find_citations(answer), documents or [make_document()])
    return result


def test_exact_quote_is_verified_with_its_span_on_the_page() -> None:
    result = verify_one('[p. 3: "the Lyon plant closed"]')

    assert result.verified and result.status == "exact" and result.score == 1.0
    assert result.document == "report.pdf" and result.page == 3
    start, end = result.span
    assert PAGES[2][start:end] == "the Lyon plant closed"


def test_matching_ignores_case_spacing_hyphenation_and_quote_marks() -> None:
    result = verify_one(
        "[p. 2: \"compared with the PREVIOUS year. The board proposes a 'generous'\"]"
    )

    assert result.verified and result.status == "exact"
    start, end = result.span
    assert PAGES[1][start:end].startswith("compared with the pre-\nvious year.")
    assert PAGES[1][start:end].endswith("“generous")  # edge punctuation is not required


def test_ellipsis_skips_text_between_fragments() -> None:
    result = verify_one('[p. 2: "Net revenue rose … 40 cents per share"]')

    assert result.verified
    start, end = result.span
    assert PAGES[1][start:end].startswith("Net revenue") and PAGES[1][start:end].endswith("share")


def test_quote_on_another_page_is_not_verified() -> None:
    result = verify_one('[p. 1: "the Lyon plant closed"]')

    assert not result.verified and result.status == "not_found"
    assert result.page == 1 and result.span is None


def test_invented_quote_is_not_verified() -> None:
    result = verify_one('[p. 3: "the Paris plant opened in June"]')

    assert not result.verified and result.status == "not_found"


def test_minor_ocr_differences_verify_fuzzily() -> None:
    result = verify_one('[p. 3: "Operatinq c0sts fell because the Lyon p1ant closed"]')

    assert result.verified and result.status == "fuzzy"
    assert 0.9 <= result.score < 1.0
    start, end = result.span
    assert PAGES[2][start:end].startswith("Operating costs")


def test_short_quotes_never_match_fuzzily() -> None:
    result = verify_one('[p. 3: "Lyom plant"]')

    assert not result.verified


def test_missing_page_and_missing_quote() -> None:
    results = verify_citations(find_citations("[p. 9] and [p. 2]"), [make_document()])

    assert [(r.verified, r.status) for r in results] == [(False, "no_page"), (False, "no_quote")]


def test_range_quote_may_cross_a_page_break() -> None:
    result = verify_one('[pp. 2-3: "40 cents per share. Operating costs fell"]')

    assert result.verified and result.page == 2
    start, end = result.span
    assert PAGES[1][start:end] == "40 cents per share."


def test_named_document_is_checked_first() -> None:
    other = make_document("notes.txt", ("Nothing relevant here.", "The Lyon plant closed."))
    results = verify_citations(
        find_citations('[notes.txt, p. 2: "Lyon plant closed"] [p. 3: "Lyon plant closed"]'),
        [make_document(), other],
    )

    assert [(r.document, r.page) for r in results] == [("notes.txt", 2), ("report.pdf", 3)]


def test_find_in_text_maps_back_to_original_characters() -> None:
    text = "Ünïcode  ﬁle-\nname here"

    start, end, score = find_in_text("unicode filename", text)

    assert (text[start:end], score) == ("Ünïcode  ﬁle-\nname", 1.0)


def test_default_prompt_asks_for_page_markers_with_quotes() -> None:
    assert '[p. 12: "' in DEFAULT_CITATION_PROMPT
    found = find_citations(DEFAULT_CITATION_PROMPT)
    assert [c.page for c in found] == [12, 3, 12]
    assert all(isinstance(c, Citation) and c.quote for c in found)

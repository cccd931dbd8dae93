"""Page citations in answers: find them, and check each quote against the cited page's text.

Grammar (case-insensitive; `ws` is optional spaces):

    citation  := "[" [document sep] locators [ws [":" | ","] ws quote] ws "]"
                 | that, followed within 3 characters (spaces, ":" or a dash) by a quote
                 | a quote, followed within 3 characters (spaces or ",;:.") by that
    document  := a name without brackets or quotes, e.g. report.pdf   sep := "," | ";" | ":"
    locators  := unit ws range { ("," | ";") ws [unit ws] range }
    unit      := "p." | "p" | "pp." | "page" | "pages" | "pg." | "section" | "sections"
                 | "sec." | "§" | "§§"
    range     := N [ws ("-" | "–" | "—") ws M]
    quote     := '"' text '"' | '“' text '”' | '«' text '»'   (one line, at most 1000 chars)

Examples: `[p. 3]`, `[p. 3: "net revenue rose"]`, `[p. 3] "net revenue rose"`,
`"net revenue rose" [p. 3]`, `[pp. 3-4]`, `[p. 3, 7]`, `[section 2]`,
`[report.pdf, p. 3: "..."]`. A list (`[p. 3, 7]`) gives one Citation per range, sharing
the quote. A quote inside the brackets wins over one beside them; a quote beside them is
used by one citation only (the one before it in `"a" [p. 1] "b" [p. 2]`).

Matching ignores case, whitespace, hyphens and dashes (so a word hyphenated across a line
break matches), accents, ligatures (NFKC) and the style of quote marks; an ellipsis in a
quote ("..." or "…") matches any text in between. A quote that fails exactly may still
verify at difflib similarity >= 0.9 (minor OCR differences) if it is at least 16 characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

from engine.documents.base import Document

FUZZY_THRESHOLD = 0.9
FUZZY_MIN_CHARS = 16
FUZZY_MAX_CHARS = 200_000  # a sliding window over more text than this is too slow to be worth it

DEFAULT_CITATION_PROMPT = (
    "When your answer uses the attached documents, cite the source right after each claim: "
    "the page marker shown in the document, with a short quote copied word for word from "
    'that page inside the brackets, like [p. 12: "exact words from the page"]. For documents '
    'divided into sections, cite the section the same way: [section 3: "exact words"]. '
    "When several documents are attached, put the document's name first: "
    '[report.pdf, p. 12: "exact words"]. Keep each quote short (a few words to one sentence) '
    "and copy it exactly, without changing spelling or punctuation. Cite only pages you have "
    "read, and if the documents do not answer the question, say so instead of guessing."
)

_UNIT = r"(?:pp?\.?|pages?|pg\.?|sections?|sec\.?|§§?)"
_RANGE = r"\d{1,6}(?:\s*[-–—]\s*\d{1,6})?"
_LOCATORS = rf"{_UNIT}\s*{_RANGE}(?:\s*[,;]\s*(?:{_UNIT}\s*)?{_RANGE})*"
_QUOTE = r'(?:"(?P<{0}a>[^"\n]{{1,1000}})"|“(?P<{0}b>[^”\n]{{1,1000}})”|«\s?(?P<{0}c>[^»\n]{{1,1000}}?)\s?»)'
_BRACKET = re.compile(
    rf"\[\s*(?:(?!{_UNIT}\s*\d)(?P<doc>[^\[\]\n\"“”«»]{{1,200}}?)\s*[,;:]\s*)?"
    rf"(?P<loc>{_LOCATORS})\s*(?:[:,]?\s*{_QUOTE.format('in')}\s*)?\]",
    re.IGNORECASE,
)
_ANY_QUOTE = re.compile(_QUOTE.format("q"))
_RANGE_PARTS = re.compile(
    rf"(?P<unit>{_UNIT})?\s*(?P<first>\d+)(?:\s*[-–—]\s*(?P<last>\d+))?", re.I
)
_ELLIPSIS = re.compile(r"\[?(?:\.\s?\.\s?\.|…)\]?")
_DASHES = set("-\u00ad\ufffe\x02‐‑‒–—―−")
# Single and double, straight and curly: a model retyping a quote picks any of them.
_QUOTE_MARKS = dict.fromkeys("'\"‘’‚‛′`´“”„‟″«»‹›", "'")
_EDGE_PUNCTUATION = ".,;:!?'\"()"

_Finder = Callable[[str, str, int], "tuple[int, int, float] | None"]


@dataclass(frozen=True)
class Citation:
    """A citation found in an answer; `start`/`end` span its marker (and quote) in the answer."""

    page: int
    end_page: int
    quote: str | None
    document: str | None
    unit: str  # "page" or "section"
    start: int
    end: int


@dataclass(frozen=True)
class VerifiedCitation:
    """A citation checked against the documents.

    `status` is "exact" or "fuzzy" (verified), "not_found" (the quote is not on the page),
    "no_quote" (nothing to check) or "no_page" (no attached document has that page).
    `span` is the quote's [start, end) in `Page.text` of `page` in `document`, for highlighting.
    """

    citation: Citation
    verified: bool
    status: str
    document: str | None = None
    page: int | None = None
    span: tuple[int, int] | None = None
    score: float = 0.0


def find_citations(answer: str) -> list[Citation]:
    """Every citation in `answer`, in order of appearance (see the module docstring's grammar)."""
    brackets = list(_BRACKET.finditer(answer))
    taken = [(m.start(), m.end()) for m in brackets]
    loose = [q for q in _ANY_QUOTE.finditer(answer) if not _overlaps(q, taken)]
    used: set[int] = set()
    citations: list[Citation] = []
    for match in brackets:
        quote, start, end = _quote_for(match, answer, loose, used)
        document = match.group("doc").strip() if match.group("doc") else None
        for unit, first, last in _ranges(match.group("loc")):
            citations.append(Citation(first, last, quote, document, unit, start, end))
    return citations


def _overlaps(match: re.Match[str], spans: list[tuple[int, int]]) -> bool:
    return any(match.start() < end and start < match.end() for start, end in spans)


def _quote_text(match: re.Match[str], prefix: str) -> str | None:
    for suffix in "abc":
        text = match.group(prefix + suffix)
        if text is not None:
            return text.strip()
    return None


def _quote_for(
    match: re.Match[str], answer: str, loose: list[re.Match[str]], used: set[int]
) -> tuple[str | None, int, int]:
    """The citation's quote and the span of marker plus quote in the answer."""
    inner = _quote_text(match, "in")
    if inner:
        return inner, match.start(), match.end()
    for index, quote in enumerate(loose):
        if index in used:
            continue
        before = answer[quote.end() : match.start()]
        after = answer[match.end() : quote.start()]
        if quote.end() <= match.start() and re.fullmatch(r"\s{0,2}[,;:.]?\s{0,2}", before):
            used.add(index)
            return _quote_text(quote, "q"), quote.start(), match.end()
        if quote.start() >= match.end() and re.fullmatch(r"[ \t]{0,2}[:–—-]?[ \t]{0,2}", after):
            used.add(index)
            return _quote_text(quote, "q"), match.start(), quote.end()
    return None, match.start(), match.end()


def _ranges(locators: str) -> list[tuple[str, int, int]]:
    ranges = []
    unit = "page"
    for part in _RANGE_PARTS.finditer(locators):
        if part.group("unit"):
            unit = "section" if part.group("unit").lower().startswith(("s", "§")) else "page"
        first = int(part.group("first"))
        last = int(part.group("last") or first)
        ranges.append((unit, min(first, last), max(first, last)))
    return ranges


def verify_citations(
    citations: Sequence[Citation], documents: Sequence[Document]
) -> list[VerifiedCitation]:
    """Check each citation's quote against the text of the page(s) it cites.

    A citation naming a document is checked against that document (all of them if the
    name matches none); otherwise against every document having the page, first match wins.
    """
    return [_verify(citation, _candidates(citation, documents)) for citation in citations]


def _candidates(citation: Citation, documents: Sequence[Document]) -> list[Document]:
    if citation.document is None:
        return list(documents)
    wanted = citation.document.strip("'\" ").casefold()
    named = [d for d in documents if wanted in (d.name.casefold(), d.path.stem.casefold())]
    named = named or [d for d in documents if wanted in d.name.casefold()]
    return named or list(documents)


def _verify(citation: Citation, documents: list[Document]) -> VerifiedCitation:
    having = [d for d in documents if d.page(citation.page) is not None]
    if not having:
        return VerifiedCitation(citation, False, "no_page")
    if not citation.quote:
        return VerifiedCitation(citation, False, "no_quote", having[0].name, citation.page)
    for document in having:
        found = locate_quote(citation.quote, document, citation.page, citation.end_page)
        if found is not None:
            page, span, score = found
            status = "exact" if score == 1.0 else "fuzzy"
            return VerifiedCitation(citation, True, status, document.name, page, span, score)
    return VerifiedCitation(citation, False, "not_found", having[0].name, citation.page)


def locate_quote(
    quote: str, document: Document, first: int, last: int | None = None
) -> tuple[int, tuple[int, int], float] | None:
    """Find `quote` on pages first..last of `document`.

    Returns:
        (page number, [start, end) span in that page's text, score 1.0 exact or the fuzzy
        similarity), or None when the quote is not there.
    """
    pages = [p for n in range(first, (last or first) + 1) if (p := document.page(n)) is not None]
    joined = "\n".join(page.text for page in pages)
    found = find_in_text(quote, joined)
    if found is None:
        return None
    start, end, score = found
    for page in pages:
        if start <= len(page.text):
            return page.number, (start, min(end, len(page.text))), score
        start, end = start - len(page.text) - 1, end - len(page.text) - 1
    return None


def find_in_text(quote: str, text: str) -> tuple[int, int, float] | None:
    """The [start, end) span of `quote` in `text` and its score, or None (see the module doc)."""
    hay, index = normalize(text)
    # A quote's own edge punctuation ("grew 5%.") often differs from the page's ("grew 5%,").
    fragments = [normalize(part)[0].strip(_EDGE_PUNCTUATION) for part in _ELLIPSIS.split(quote)]
    fragments = [fragment for fragment in fragments if fragment]
    if not fragments or not hay:
        return None
    found = _find_fragments(hay, fragments, _exact)
    if found is None and len(hay) <= FUZZY_MAX_CHARS:
        found = _find_fragments(hay, fragments, _fuzzy)
    if found is None:
        return None
    start, end, score = found
    return index[start], index[end - 1] + 1, score


def _find_fragments(hay: str, fragments: list[str], find: _Finder) -> tuple[int, int, float] | None:
    position, start, score = 0, -1, 1.0
    for fragment in fragments:
        found = find(hay, fragment, position)
        if found is None:
            return None
        if start < 0:
            start = found[0]
        position, score = found[1], min(score, found[2])
    return start, position, score


def _exact(hay: str, needle: str, position: int) -> tuple[int, int, float] | None:
    start = hay.find(needle, position)
    return None if start < 0 else (start, start + len(needle), 1.0)


def _fuzzy(hay: str, needle: str, position: int) -> tuple[int, int, float] | None:
    size = len(needle)
    if size < FUZZY_MIN_CHARS:
        return _exact(hay, needle, position)
    matcher = SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(needle)  # the needle's index is built once; windows slide over the hay
    best: tuple[int, int, float] | None = None
    for start in range(position, max(position, len(hay) - size) + 1):
        matcher.set_seq1(hay[start : start + size])
        if matcher.real_quick_ratio() < FUZZY_THRESHOLD or matcher.quick_ratio() < FUZZY_THRESHOLD:
            continue
        score = matcher.ratio()
        if score >= FUZZY_THRESHOLD and (best is None or score > best[2]):
            best = (start, min(start + size, len(hay)), score)
    return best


def normalize(text: str) -> tuple[str, list[int]]:
    """Fold text for matching; returns the folded text and, per folded char, its source index."""
    folded: list[str] = []
    index: list[int] = []
    for position, char in enumerate(text):
        for piece in _fold(char):
            folded.append(piece)
            index.append(position)
    return "".join(folded), index


@lru_cache(maxsize=8192)
def _fold(char: str) -> str:
    if char.isspace() or char in _DASHES:
        return ""
    if char in _QUOTE_MARKS:
        return _QUOTE_MARKS[char]
    decomposed = unicodedata.normalize("NFKD", char)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFKC", kept).casefold().replace(" ", "")

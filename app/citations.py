"""Citations of an answer, as the app keeps them: labels, plain-word status, storage, export."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATUS_TEXT = {
    "exact": "Verified: the quote appears word for word on this page.",
    "fuzzy": "Verified: the quote appears on this page with small differences.",
    "not_found": "Not verified: the quote was not found on this page.",
    "no_quote": "Not verified: the answer cites this page without a quote to check.",
    "no_page": "Not verified: no attached document has this page.",
}


@dataclass(frozen=True)
class Citation:
    """One [p. N: "quote"] of an answer and what the engine's check found."""

    text: str
    document: Path | None
    page: int
    quote: str
    verified: bool
    status: str
    span_start: int = -1
    span_end: int = -1

    @property
    def has_span(self) -> bool:
        return 0 <= self.span_start < self.span_end

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["document"] = str(self.document) if self.document is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Citation:
        document = data.get("document")
        return cls(
            str(data.get("text", "")),
            Path(str(document)) if document else None,
            int(data.get("page", 0)),
            str(data.get("quote", "")),
            bool(data.get("verified", False)),
            str(data.get("status", "not_found")),
            int(data.get("span_start", -1)),
            int(data.get("span_end", -1)),
        )


def status_text(status: str) -> str:
    return STATUS_TEXT.get(status, f"Not verified ({status}).")


def chip_label(citation: Citation, show_document: bool) -> str:
    """ "p. 2", or "report.pdf p. 2" when the answer cites several documents."""
    page = f"p. {citation.page}"
    if show_document and citation.document is not None:
        return f"{citation.document.name} {page}"
    return page


def chip_tooltip(citation: Citation) -> str:
    lines = [status_text(citation.status)]
    if citation.document is not None:
        lines.append(f"{citation.document.name}, page {citation.page}")
    if citation.quote:
        lines.append(f"“{citation.quote}”")
    return "\n".join(lines)


def cites_several_documents(citations: list[Citation]) -> bool:
    return len({c.document for c in citations if c.document is not None}) > 1


def citations_markdown(citations: list[Citation]) -> list[str]:
    """Markdown lines for an exported answer: one bullet per citation, with its check."""
    if not citations:
        return []
    lines = ["**Citations**", ""]
    for c in citations:
        mark = "✅ verified" if c.verified else "⚠️ not verified"
        where = f"{c.document.name}, p. {c.page}" if c.document is not None else f"p. {c.page}"
        quote = f": “{c.quote}”" if c.quote else ""
        lines.append(f"- {where}{quote} ({mark}: {c.status.replace('_', ' ')})")
    return [*lines, ""]

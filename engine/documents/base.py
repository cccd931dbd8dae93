"""Document and Page: a dropped file's text cut into citable pages or sections."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CancelledError

Progress = Callable[[int, int], None]
IsCancelled = Callable[[], bool]

# Text without real pages is cut into sections of about this many characters (~750 tokens),
# small enough that a citation points at something a reader can scan.
SECTION_CHARS = 3000
# Pixtral-style vision encoder: 14 px patches merged 2x2, one break token per row.
VISION_MAX_SIDE = 1540
VISION_TOKEN_PX = 28


@dataclass(frozen=True)
class Page:
    """One citable unit: a PDF page, or a section of a document without pages."""

    number: int
    text: str
    label: str
    title: str = ""

    @property
    def marker(self) -> str:
        """The bracketed marker that precedes the page in the prompt, e.g. `[p. 3]`."""
        return f"[{self.label}]"


@dataclass(frozen=True)
class Document:
    """A read document: its pages in order, plus what the user should know about it."""

    path: Path
    kind: str
    pages: tuple[Page, ...]
    note: str = ""
    scanned_pages: tuple[int, ...] = ()
    image_tokens: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_chars(self) -> int:
        return sum(len(page.text) for page in self.pages)

    def page(self, number: int) -> Page | None:
        """The page numbered `number` (1-based), or None if there is none."""
        if 1 <= number <= len(self.pages) and self.pages[number - 1].number == number:
            return self.pages[number - 1]
        return next((page for page in self.pages if page.number == number), None)

    def as_prompt_text(self, numbers: Iterable[int] | None = None) -> str:
        """Render the document for the model, each page preceded by its citation marker.

        Args:
            numbers: only these page numbers (the user's choice when all do not fit).
        Returns:
            `<document name="...">` ... `</document>` with `[p. N]` / `[section N]` markers.
        """
        wanted = None if numbers is None else set(numbers)
        name = self.name.replace('"', "'")
        parts = [f'<document name="{name}" kind="{self.kind}" pages="{len(self.pages)}">']
        for page in self.pages:
            if wanted is not None and page.number not in wanted:
                continue
            header = page.marker + (f" {page.title}" if page.title else "")
            parts.append(f"{header}\n{self._page_body(page)}\n")
        parts.append("</document>")
        return "\n".join(parts)

    def _page_body(self, page: Page) -> str:
        if page.number in self.scanned_pages:
            return "(scanned page without a text layer: it is attached as an image)"
        return page.text.strip() or "(blank page)"


class Work:
    """Progress reporting and cancel checks shared by every reader."""

    def __init__(self, progress: Progress | None, is_cancelled: IsCancelled | None) -> None:
        self._progress = progress
        self._is_cancelled = is_cancelled
        self._last = -1

    def check(self) -> None:
        """Raise CancelledError if the user cancelled."""
        if self._is_cancelled is not None and self._is_cancelled():
            raise CancelledError("Reading the document was cancelled.")

    def report(self, done: int, total: int) -> None:
        """Report `done` of `total` units (pages, sheets, sections or bytes); never backwards."""
        done = max(min(done, total), self._last)
        self._last = done
        if self._progress is not None:
            self._progress(done, total)


def image_token_cost(width: int, height: int, max_side: int = VISION_MAX_SIDE) -> int:
    """Tokens the vision encoder spends on a `width` x `height` image after fitting `max_side`."""
    scale = min(1.0, max_side / max(width, height, 1))
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    columns = math.ceil(width / VISION_TOKEN_PX)
    rows = math.ceil(height / VISION_TOKEN_PX)
    return columns * rows + rows


def split_text(text: str, target: int = SECTION_CHARS) -> list[str]:
    """Cut text into pieces of about `target` characters at paragraph, line or word breaks."""
    return [piece.strip("\n") for piece in cut_text(text, target) if piece.strip()]


def cut_text(text: str, target: int = SECTION_CHARS) -> list[str]:
    """Like split_text, but the pieces keep their edges, so joined they give back `text`."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > target:
        cut = _best_cut(text, start, start + target)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _best_cut(text: str, start: int, end: int) -> int:
    floor = start + (end - start) // 2
    for separator in ("\n\n", "\n", " "):
        found = text.rfind(separator, floor, end)
        if found != -1:
            return found + len(separator)
    return end


def section_pages(texts: Iterable[str], titles: Iterable[str] | None = None) -> tuple[Page, ...]:
    """Number pieces of text as `section 1`, `section 2`, ... pages."""
    title_list = list(titles) if titles is not None else []
    pages = []
    for index, text in enumerate(texts):
        title = title_list[index] if index < len(title_list) else ""
        pages.append(Page(index + 1, text, f"section {index + 1}", title))
    return tuple(pages)


def sectioned_document(path: Path, kind: str, text: str, work: Work) -> Document:
    """A Document for text without real pages, cut into sections with progress per section."""
    pieces = split_text(text)
    for done in range(len(pieces)):
        work.check()
        work.report(done + 1, len(pieces))
    return Document(path=path, kind=kind, pages=section_pages(pieces))


def markdown_table(rows: list[list[str]]) -> str:
    """Rows of cell strings as a Markdown table whose first row is the header."""
    width = max(len(row) for row in rows)
    padded = [row + [""] * (width - len(row)) for row in rows]
    lines = ["| " + " | ".join(padded[0]) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(row) + " |" for row in padded[1:]]
    return "\n".join(lines)

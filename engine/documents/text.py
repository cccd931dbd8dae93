"""Plain text and Markdown: encoding detection and streaming into ~3000-character sections."""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.documents.base import Document, Work, cut_text, section_pages
from engine.errors import DocumentError

CHUNK_BYTES = 1 << 20


def detect_encoding(path: Path, work: Work | None = None) -> str:
    """Return "utf-8-sig" or "utf-16" from a BOM, else "utf-8" if it all decodes, else "cp1252".

    Without a BOM the whole file is checked as UTF-8 (about 1 GB/s) rather than a prefix,
    so an accented character on page 300 cannot break the read half-way.
    """
    with _opened(path) as file:
        head = file.read(4)
        if head.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16"
        file.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
                if work is not None:
                    work.check()
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "cp1252"
    return "utf-8"


class TextPosition:
    """How far into a text file its reader has got, in bytes, for progress reports."""

    def __init__(self, raw: io.BufferedReader, size: int) -> None:
        self._raw = raw
        self.size = size

    @property
    def done(self) -> int:
        return self._raw.tell()


@contextmanager
def open_text(
    path: Path, work: Work | None = None
) -> Iterator[tuple[io.TextIOWrapper, TextPosition]]:
    """Open a text file with its detected encoding; yields (text stream, position in bytes)."""
    encoding = detect_encoding(path, work)
    with _opened(path) as raw:
        size = path.stat().st_size
        # cp1252 leaves five bytes undefined; replace them rather than fail on a stray one.
        stream = io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline=None)
        try:
            yield stream, TextPosition(raw, size)
        finally:
            stream.detach()


def read_markdown(path: Path, work: Work) -> Document:
    """Read a Markdown file: kept as written, cut into sections like plain text."""
    return read_text(path, work, kind="markdown")


def read_text(path: Path, work: Work, kind: str = "text") -> Document:
    """Stream a text or Markdown file into sections without holding it whole in memory."""
    sections: list[str] = []
    carry = ""
    with open_text(path, work) as (stream, position):
        while chunk := stream.read(CHUNK_BYTES):
            work.check()
            pieces = cut_text(carry + chunk.replace("\x00", ""))
            # The last piece may continue in the next chunk: keep it for the next round.
            carry = pieces.pop()
            sections.extend(piece.strip("\n") for piece in pieces if piece.strip())
            work.report(position.done, position.size)
    if carry.strip():
        sections.append(carry.strip("\n"))
    work.report(position.size, position.size)
    return Document(path=path, kind=kind, pages=section_pages(sections))


@contextmanager
def _opened(path: Path) -> Iterator[io.BufferedReader]:
    try:
        file = path.open("rb")
    except OSError as exc:
        raise DocumentError(f"{path.name} cannot be read ({exc.strerror}).") from exc
    with file:
        yield file

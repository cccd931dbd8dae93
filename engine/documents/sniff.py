"""What a dropped file really is: magic bytes first, the extension second, limits checked."""

from __future__ import annotations

import zipfile
from pathlib import Path

from engine.errors import DocumentError, UnsupportedFileError

GIB = 1 << 30
MIB = 1 << 20
# Plain text is streamed, so the cap only refuses absurd inputs (2 GiB is ~500M tokens,
# 2000x the context); HTML is parsed whole into a bs4 tree (~1.5 s and ~10x memory per MB).
TEXT_LIMIT = 2 * GIB
HTML_LIMIT = 64 * MIB
# DOCX/XLSX are zip archives that their libraries inflate in memory.
ZIP_TOTAL_LIMIT = GIB
ZIP_RATIO_LIMIT = 200
ZIP_RATIO_MIN_SIZE = MIB  # small XML parts legitimately compress very well
ZIP_MEMBER_LIMIT = 100_000

SUFFIX_KINDS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".xlsx": "xlsx",
    ".xlsm": "xlsx",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".text": "text",
    ".log": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
}
_BINARY_KINDS = {"pdf", "docx", "xlsx"}
_TEXT_KINDS = {"text", "markdown", "csv", "html"}
_KIND_NAMES = {"pdf": "a PDF", "docx": "a Word document", "xlsx": "an Excel workbook"}
_SUPPORTED = "Quire reads PDF, Word (.docx), Excel (.xlsx), CSV, text, Markdown and HTML files."
_AS_IMAGE = "Drop it on the image area instead, so the model can look at it."
_RESAVE = "Open it in its program and save it as .docx, .xlsx or PDF, then drop that file."
_OLE2 = b"\xd0\xcf\x11\xe0"  # also the container of password-protected .docx/.xlsx
_MAGIC = (
    (b"MZ", "a Windows program", _SUPPORTED),
    (b"\x7fELF", "a Linux program", _SUPPORTED),
    (b"\xcf\xfa\xed\xfe", "a macOS program", _SUPPORTED),
    (b"\xca\xfe\xba\xbe", "a macOS program", _SUPPORTED),
    (b"\x89PNG", "a PNG image", _AS_IMAGE),
    (b"\xff\xd8\xff", "a JPEG image", _AS_IMAGE),
    (b"GIF8", "a GIF image", _AS_IMAGE),
    (b"II*\x00", "a TIFF image", _AS_IMAGE),
    (b"MM\x00*", "a TIFF image", _AS_IMAGE),
    (_OLE2, "an old-style Office file (.doc, .xls or .ppt)", _RESAVE),
    (b"{\\rtf", "an RTF document", _RESAVE),
    (b"\x1f\x8b", "a gzip archive", _SUPPORTED),
    (b"7z\xbc\xaf", "a 7-Zip archive", _SUPPORTED),
    (b"Rar!", "a RAR archive", _SUPPORTED),
    (b"%!PS", "a PostScript file", _SUPPORTED),
)


def detect_kind(path: Path) -> str:
    """Return the kind of the file at `path` after checking that it can be read safely.

    Raises:
        DocumentError: missing, empty, unreadable, damaged or absurdly large.
        UnsupportedFileError: not a format Quire reads (whatever its extension says).
    """
    size = _file_size(path)
    if size == 0:
        raise DocumentError(
            f"{path.name} is empty (0 bytes). Check that the file was saved or copied completely."
        )
    suffix_kind = SUFFIX_KINDS.get(path.suffix.lower())
    if suffix_kind is not None and suffix_kind in _TEXT_KINDS:
        _check_size(path, suffix_kind, size)  # before reading: it may be a sparse giant
    head = _read_head(path)
    kind = _magic_kind(path, head)
    if kind is None:
        _refuse_binary(path, head, suffix_kind)
        kind = _text_kind(head, suffix_kind)
    elif suffix_kind in _BINARY_KINDS and suffix_kind != kind:
        raise UnsupportedFileError(
            f"{path.name} is named {path.suffix} but is really {_KIND_NAMES[kind]}. "
            f"Rename it to .{kind} and drop it again."
        )
    _check_size(path, kind, size)
    return kind


def _file_size(path: Path) -> int:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DocumentError(
            f"{path.name} was not found. It may have been moved or deleted."
        ) from None
    except OSError as exc:
        raise DocumentError(f"{path.name} cannot be opened ({exc.strerror}).") from exc
    if not path.is_file():
        raise UnsupportedFileError(
            f"{path.name} is a folder, not a file. Drop the files inside it."
        )
    return stat.st_size


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(8192)
    except OSError as exc:
        raise DocumentError(
            f"{path.name} cannot be read ({exc.strerror}). Check that you may open it."
        ) from exc


def _magic_kind(path: Path, head: bytes) -> str | None:
    # The PDF specification tolerates bytes before the header; readers look in the first KiB.
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return check_zip(path)
    return None


def _refuse_binary(path: Path, head: bytes, suffix_kind: str | None) -> None:
    looks_text = b"\x00" not in head or head.startswith((b"\xff\xfe", b"\xfe\xff"))
    if looks_text and suffix_kind in _TEXT_KINDS:
        return
    if suffix_kind in ("docx", "xlsx") and head.startswith(_OLE2):
        raise DocumentError(
            f"{path.name} is protected by a password (or saved in the old Office format). "
            "Open it in Word or Excel, remove the password or save it as a new "
            f"{path.suffix} file, and drop that copy."
        )
    for magic, what, advice in _MAGIC:
        if head.startswith(magic):
            raise UnsupportedFileError(f"{path.name} is {what}, which Quire cannot read. {advice}")
    if suffix_kind in _BINARY_KINDS:
        raise UnsupportedFileError(
            f"{path.name} is named {path.suffix} but its contents are not {_KIND_NAMES[suffix_kind]}. "
            "Check that you dropped the right file, or open it in its program and save it again."
        )
    if not looks_text:
        raise UnsupportedFileError(
            f"{path.name} is not a document Quire can read (it holds binary data). {_SUPPORTED}"
        )


def _text_kind(head: bytes, suffix_kind: str | None) -> str:
    if suffix_kind is not None:
        return suffix_kind
    start = head.lstrip()[:64].lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "text"


def _check_size(path: Path, kind: str, size: int) -> None:
    limit = HTML_LIMIT if kind == "html" else TEXT_LIMIT
    if kind in _TEXT_KINDS and size > limit:
        raise DocumentError(
            f"{path.name} is {_human(size)} of text, far more than the model can read "
            f"(its 256K-token context holds about 1 MB of text; the limit for this kind of file "
            f"is {limit // MIB} MiB). Split it or drop only the part you need."
        )


def _human(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"


def check_zip(path: Path) -> str:
    """Return "docx" or "xlsx" for a safe Office archive, judged from its zip directory alone.

    Declared sizes are an upper bound on what Python's zipfile will inflate, so checking
    them before any member is opened stops zip bombs without decompressing anything.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DocumentError(
            f"{path.name} is damaged (its zip structure cannot be read). "
            "Open it in its program and save it again, or export it as PDF."
        ) from exc
    _check_zip_sizes(path, members)
    names = {member.filename for member in members}
    if "word/document.xml" in names:
        return "docx"
    if "xl/workbook.xml" in names:
        return "xlsx"
    if any(name.startswith("ppt/") for name in names):
        what = "a PowerPoint presentation"
    elif "mimetype" in names:
        what = "an OpenDocument file"
    else:
        what = "a zip archive"
    raise UnsupportedFileError(
        f"{path.name} is {what}, which Quire cannot read. Export it as PDF or .docx, "
        "or unpack the archive and drop the documents inside."
    )


def _check_zip_sizes(path: Path, members: list[zipfile.ZipInfo]) -> None:
    total = sum(member.file_size for member in members)
    worst = max(
        (
            m.file_size / max(m.compress_size, 1)
            for m in members
            if m.file_size >= ZIP_RATIO_MIN_SIZE
        ),
        default=0.0,
    )
    if len(members) > ZIP_MEMBER_LIMIT or total > ZIP_TOTAL_LIMIT or worst > ZIP_RATIO_LIMIT:
        raise DocumentError(
            f"{path.name} was not opened: it would expand to {total / MIB:,.0f} MiB "
            f"({len(members)} parts, compressed up to {worst:,.0f}x), which is not what a real "
            "document looks like and could exhaust memory. If you trust the file, open it in "
            "its program and export it as PDF."
        )

"""Connects dropped files to the engine: document text for prompts (cached by file identity)
and the DocumentRead description the app shows on a file's chip."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from engine import api
from engine.errors import DocumentError, InputError, UnsupportedFileError
from engine.images import num_image_tokens, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
MAX_CACHED_DOCUMENTS = 16
_cache: OrderedDict[tuple[str, int, int], object] = OrderedDict()


def _identity(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise DocumentError(f"{path.name} can no longer be read ({exc}). Attach it again.") from exc
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def load_document(path: Path, progress=None, is_cancelled=None):
    """engine.documents.read_document, memoised on (path, mtime, size): follow-up questions
    about the same file do not parse it again."""
    from engine.documents import read_document

    key = _identity(path)
    doc = _cache.get(key)
    if doc is None:
        doc = read_document(path, progress=progress, is_cancelled=is_cancelled)
        _cache[key] = doc
        while len(_cache) > MAX_CACHED_DOCUMENTS:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return doc


def parse_pages(spec: str, num_pages: int, name: str = "the document") -> list[int]:
    """"1-20, 25" -> [1..20, 25]; a page outside 1..num_pages is an InputError."""
    numbers: list[int] = []
    for part in spec.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo_text, _, hi_text = part.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text or lo_text)
        except ValueError as exc:
            raise InputError(f"'{part}' is not a page range; write pages like 1-20, 25.") from exc
        if not 1 <= lo <= hi <= num_pages:
            raise InputError(f"{name} has pages 1-{num_pages}; '{part}' is outside that range.")
        numbers.extend(range(lo, hi + 1))
    return sorted(set(numbers))


def describe_file(req: api.ReadDocument, count_tokens: Callable[[str], list[int]] | None,
                  is_cancelled: Callable[[], bool]) -> api.DocumentRead:
    path = Path(req.path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file. Attach it again.")
    size = path.stat().st_size
    if path.suffix.lower() in IMAGE_SUFFIXES:
        img = open_image(path)
        return api.DocumentRead(req.request_id, path, "image", 1, num_image_tokens(*img.size), size)
    try:
        doc = load_document(path, is_cancelled=is_cancelled)
    except ImportError as exc:  # pragma: no cover - packaging problem
        raise UnsupportedFileError(f"Quire cannot read {path.name} here ({exc}).") from exc
    num_tokens = len(count_tokens(doc.as_prompt_text())) if count_tokens else 0
    return api.DocumentRead(req.request_id, path, doc.kind, len(doc.pages), num_tokens, size,
                            getattr(doc, "note", ""))

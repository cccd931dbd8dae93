"""`python -m engine.documents FILE [--json]`: print the pages Quire extracts from a file."""

from __future__ import annotations

import argparse
import json
import sys

from engine.documents.base import Document
from engine.documents.reader import read_document
from engine.errors import QuireError


def main(argv: list[str] | None = None) -> int:
    """Print the document's pages (or one JSON object); 2 with a message on stderr on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.documents", description="Print the text Quire extracts from a file."
    )
    parser.add_argument("file", help="PDF, DOCX, XLSX, CSV, TXT, MD or HTML file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        document = read_document(args.file)
    except QuireError as exc:
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(as_json(document), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(as_plain_text(document))
    return 0


def as_json(document: Document) -> dict[str, object]:
    """The document as a JSON-ready dict: path, kind, pages [{number, label, title, text}], note."""
    return {
        "path": str(document.path),
        "kind": document.kind,
        "pages": [
            {"number": p.number, "label": p.label, "title": p.title, "text": p.text}
            for p in document.pages
        ],
        "note": document.note,
        "scanned_pages": list(document.scanned_pages),
        "image_tokens": document.image_tokens,
    }


def as_plain_text(document: Document) -> str:
    """The pages under `=== [p. N] ===` headers, the note (if any) first."""
    parts = [f"note: {document.note}\n"] if document.note else []
    for page in document.pages:
        title = f" {page.title}" if page.title else ""
        parts.append(f"=== {page.marker}{title} ===\n{page.text.strip()}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())

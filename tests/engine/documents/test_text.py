"""Text, Markdown and HTML: encodings, sections, boilerplate stripped."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.documents import read_document
from engine.documents import text as text_module
from engine.errors import DocumentError

NOTE = "Prix: 12 € — café crème, naïve façade."


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "cp1252"])
def test_text_encodings_are_detected(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "note.txt"
    path.write_bytes(f"{NOTE}\r\nSecond line.\r\n".encode(encoding))  # utf-16/-sig add a BOM

    document = read_document(path)

    assert document.kind == "text"
    assert document.pages[0].text == f"{NOTE}\nSecond line."


def test_invalid_utf8_late_in_the_file_falls_back_to_cp1252(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 64)
    path = tmp_path / "late.txt"
    path.write_bytes(b"plain ascii words " * 20 + "déjà".encode("cp1252"))

    assert read_document(path).pages[-1].text.endswith("déjà")


def test_long_text_is_cut_into_sections_at_paragraphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_module, "CHUNK_BYTES", 1000)  # many chunks: cuts across reads
    paragraphs = [f"Paragraph {n}. " + "word " * 120 for n in range(40)]
    path = tmp_path / "book.md"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")

    document = read_document(path)

    assert document.kind == "markdown"
    assert len(document.pages) >= 8
    assert all(len(page.text) <= 3000 for page in document.pages)
    assert all(page.text.startswith("Paragraph ") for page in document.pages)
    rebuilt = "\n\n".join(page.text for page in document.pages)
    assert rebuilt.split() == "\n\n".join(paragraphs).split()
    assert [page.label for page in document.pages[:2]] == ["section 1", "section 2"]


def test_markdown_keeps_its_markup(tmp_path: Path) -> None:
    path = tmp_path / "readme.md"
    path.write_text("# Title\n\n- item one\n- item two\n", encoding="utf-8")

    assert read_document(path).pages[0].text == "# Title\n\n- item one\n- item two"


def test_whitespace_only_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\t\n", encoding="utf-8")

    with pytest.raises(DocumentError, match="contains no text"):
        read_document(path)


PAGE = """<!DOCTYPE html>
<html><head><title>Site</title><style>p {color: red}</style>
<script>var tracking = "SCRIPT TEXT";</script></head>
<body>
<header><nav><a href="/">Home</a> | <a href="/about">About us</a></nav></header>
<aside>Related links SIDEBAR</aside>
<main>
  <article>
    <h1>Annual   report</h1>
    <p>Revenue <b>grew</b> by <i>12%</i> in 2025.<br>Costs fell.</p>
    <h2>Regions</h2>
    <ul><li>Europe</li><li>Asia</li></ul>
    <table><tr><th>Region</th><th>Sales</th></tr><tr><td>Europe</td><td>40</td></tr></table>
    <!-- a hidden comment -->
  </article>
</main>
<footer>Copyright FOOTER TEXT</footer>
</body></html>"""


def test_html_keeps_the_content_and_drops_the_chrome(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text(PAGE, encoding="utf-8")

    document = read_document(path)

    assert document.kind == "html"
    assert document.pages[0].text == (
        "# Annual report\n\nRevenue grew by 12% in 2025.\nCosts fell.\n\n## Regions\n\n"
        "- Europe\n- Asia\n\n| Region | Sales |\n|---|---|\n| Europe | 40 |"
    )


def test_html_without_extension_is_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "saved_page"
    path.write_text("<!doctype html><html><body><p>Only this.</p></body></html>", "utf-8")

    document = read_document(path)

    assert document.kind == "html" and document.pages[0].text == "Only this."

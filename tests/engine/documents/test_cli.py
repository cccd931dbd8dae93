"""`python -m engine.documents FILE [--json]` in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.engine.documents.builders import PAGE_TEXTS

ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.documents", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_json_lists_every_page_with_its_number(report_pdf: Path) -> None:
    result = run_cli(str(report_pdf), "--json")

    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["path"] == str(report_pdf)
    assert payload["kind"] == "pdf"
    assert payload["note"] == ""
    assert [page["number"] for page in payload["pages"]] == [1, 2, 3, 4]
    assert [" ".join(page["text"].split()) for page in payload["pages"]] == list(PAGE_TEXTS)


def test_plain_output_marks_pages(report_pdf: Path) -> None:
    result = run_cli(str(report_pdf))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("=== [p. 1] ===\nThe quarterly report")
    assert "=== [p. 4] ===" in result.stdout


def test_errors_go_to_stderr_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "empty.docx"
    path.touch()

    result = run_cli(str(path), "--json")

    assert result.returncode == 2
    assert result.stdout == ""
    assert "empty.docx is empty (0 bytes)" in result.stderr
    assert "Traceback" not in result.stderr

"""Fixtures: real PDFs built with fpdf2 in the test's temporary folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.engine.documents.builders import PAGE_TEXTS, write_pdf


@pytest.fixture
def report_pdf(tmp_path: Path) -> Path:
    return write_pdf(tmp_path / "report.pdf", PAGE_TEXTS)


@pytest.fixture
def make_pdf(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, texts: Sequence[str], password: str | None = None) -> Path:
        return write_pdf(tmp_path / name, texts, password)

    return make

"""Size budgets (style habit 1): engine modules stay small and single-purpose.

Counts code lines only (no blank lines, comments or docstrings), so a why-comment never costs
budget. app/ has its own, stricter check in tests/app.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_LIMIT = 400
FUNCTION_LIMIT = 60


def _code_lines(source: str) -> set[int]:
    lines: set[int] = set()
    docstrings = {node.body[0].value.lineno for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip or (tok.type == tokenize.STRING and tok.start[0] in docstrings):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


MODULES = sorted((ROOT / "engine").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_module_and_function_sizes(path):
    source = path.read_text(encoding="utf-8")
    code = _code_lines(source)
    assert len(code) <= MODULE_LIMIT, f"{path.name}: {len(code)} code lines > {MODULE_LIMIT}"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = {n for n in code if node.lineno <= n <= (node.end_lineno or node.lineno)}
            assert len(body) <= FUNCTION_LIMIT, (
                f"{path.name}:{node.lineno} {node.name}() has {len(body)} code lines > {FUNCTION_LIMIT}")

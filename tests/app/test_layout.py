"""House rules for app/: test twins, size budgets, the import boundary."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
FORBIDDEN = ("torch", "transformers", "safetensors")


def app_modules() -> list[Path]:
    return sorted(p for p in APP.rglob("*.py") if p.name != "__init__.py")


def twin(path: Path) -> Path:
    relative = path.relative_to(APP)
    name = "test_main.py" if path.name == "__main__.py" else f"test_{path.name}"
    return ROOT / "tests" / "app" / relative.parent / name


def test_every_module_has_a_test_twin() -> None:
    missing = [str(twin(p).relative_to(ROOT)) for p in app_modules() if not twin(p).exists()]
    assert missing == []


def test_size_budgets() -> None:
    too_long = []
    for path in app_modules():
        source = path.read_text()
        if len(source.splitlines()) > MAX_LINES:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.name}: {length} lines")
    assert too_long == []


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_engine_client_imports_the_engine() -> None:
    offenders = {}
    for path in app_modules():
        engine = {m for m in imported_modules(path) if m == "engine" or m.startswith("engine.")}
        allowed = (
            {"engine", "engine.api", "engine.service"} if path.name == "engine_client.py" else set()
        )
        if engine - allowed:
            offenders[path.name] = sorted(engine - allowed)
    assert offenders == {}


def test_no_heavy_imports_and_no_blocking_calls() -> None:
    offenders = []
    for path in app_modules():
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.name} imports {name}")
        source = path.read_text()
        for call in ("time.sleep(", ".result()", ".join()"):
            if call in source:
                offenders.append(f"{path.name} calls {call}")
    assert offenders == []


def test_widgets_do_not_import_the_engine_client() -> None:
    for path in (APP / "widgets").glob("*.py"):
        assert "app.engine_client" not in imported_modules(path), path.name

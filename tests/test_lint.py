"""Static checks that must hold for every submission: ruff clean, layering contracts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed with the test extra")
def test_ruff_is_clean():
    proc = subprocess.run(["ruff", "check", "app", "engine", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_engine_api_imports_only_the_stdlib():
    code = "import sys, engine.api, engine.service; bad = [m for m in ('torch', 'numpy', 'PySide6', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_api_dataclasses_are_frozen_with_plain_fields():
    import dataclasses
    import typing

    from engine import api

    allowed = {"str", "int", "float", "bool", "Path", "None"}
    for name, obj in vars(api).items():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            assert obj.__dataclass_params__.frozen, f"{name} must be frozen"
            for field in dataclasses.fields(obj):
                words = set(str(field.type).replace("|", " ").replace("tuple[", " ").replace("]", " ")
                            .replace(",", " ").replace("...", " ").split())
                plain = words <= allowed | {n for n, o in vars(api).items() if dataclasses.is_dataclass(o)}
                assert plain, f"{name}.{field.name}: {field.type}"
    assert typing.get_args(api.Request)

"""Settings: defaults, JSON round trip, atomic writes, unreadable files, errors."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from app.errors import SettingsError
from app.settings import Settings, SettingsFile, atomic_write_text


def test_round_trip(tmp_path: Path) -> None:
    file = SettingsFile(tmp_path)
    assert file.load() == Settings()
    changed = replace(Settings(), system_prompt="Be brief.", seed=7, theme="dark", font_size=14)
    file.save(changed)
    assert file.load() == changed
    assert json.loads(file.path.read_text())["seed"] == 7


def test_unknown_keys_and_bad_theme_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text('{"theme": "neon", "future_key": 1, "top_p": 0.5}')
    settings = SettingsFile(tmp_path).load()
    assert settings.theme == "system" and settings.top_p == 0.5


def test_corrupt_file_gives_defaults(tmp_path: Path) -> None:
    (tmp_path / "settings.json").write_text("{not json")
    assert SettingsFile(tmp_path).load() == Settings()


def test_atomic_write_keeps_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "settings.json"
    target.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # no temp file left


def test_save_failure_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SettingsError, match="disk has space"):
        SettingsFile(blocker).save(Settings())


def test_snapshot_folder_is_the_cache_folder_or_beside_a_custom_data_dir(tmp_path):
    import platformdirs

    from app.settings import APP_NAME, default_data_dir, snapshot_dir_for

    assert snapshot_dir_for(tmp_path) == tmp_path / "cache" / "kv-snapshots"
    cache = Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
    assert snapshot_dir_for(default_data_dir()) == cache / "kv-snapshots"


def test_loads_ask_the_engine_to_keep_document_prefixes(make_window, tmp_path):
    from engine import api

    created: list = []
    window = make_window(created=created, directory=tmp_path)
    window.load_demo()
    loads = [r for e in created for r in e.submitted if isinstance(r, api.LoadModel)]
    assert loads and loads[-1].snapshot_dir == tmp_path / "cache" / "kv-snapshots"


def test_expert_precision_defaults_to_8_bit_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{"gpu_budget_gb": 24.0}')  # written before the option existed
    file = SettingsFile(tmp_path)
    assert file.load().host_format == "auto" and file.load().gpu_budget_gb == 24.0
    file.save(replace(file.load(), host_format="int4"))
    assert json.loads(path.read_text())["host_format"] == "int4"
    assert file.load().host_format == "int4"
    for unknown in ('"int3"', '"INT4"', "4", "null", "[]"):
        path.write_text(f'{{"host_format": {unknown}, "top_p": 0.5}}')
        settings = file.load()
        assert settings.host_format == "auto" and settings.top_p == 0.5, unknown

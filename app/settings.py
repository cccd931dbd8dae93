"""User settings: platformdirs paths and a JSON file written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import platformdirs

from app.errors import SettingsError

log = logging.getLogger(__name__)

APP_NAME = "Quire"
THEMES = ("system", "light", "dark")
HOST_FORMATS = ("auto", "int4")  # offloaded experts: 8-bit (the engine's "auto") or 4-bit


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def snapshot_dir_for(data_dir: Path) -> Path:
    """Where document prefixes (KV snapshots) are kept: the user cache folder, or beside the
    data of a --data-dir run, so tests and portable installs stay self-contained."""
    if data_dir == default_data_dir():
        return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "kv-snapshots"
    return data_dir / "cache" / "kv-snapshots"


@dataclass
class Settings:
    """Everything the user can set; unknown keys in the file are ignored."""

    system_prompt: str = ""
    temperature: float = 0.1
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    theme: str = "system"
    font_size: int = 11
    model_dir: str = ""
    use_demo: bool = False
    gpu_budget_gb: float = 0.0  # 0 = automatic
    context_length: int = 32768
    host_format: str = "auto"  # one of HOST_FORMATS; sent as PlanModel/LoadModel.host_format

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Settings:
        known = {f.name for f in fields(cls)}
        settings = cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]
        if settings.theme not in THEMES:
            settings.theme = "system"
        if settings.host_format not in HOST_FORMATS:
            settings.host_format = "auto"
        return settings


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SettingsFile:
    """Loads and saves `Settings` as `settings.json` in the data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "settings.json"

    def load(self) -> Settings:
        if not self.path.exists():
            return Settings()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("settings unreadable, using defaults: %s", exc)
            return Settings()
        return Settings.from_dict(data if isinstance(data, dict) else {})

    def save(self, settings: Settings) -> None:
        try:
            atomic_write_text(self.path, json.dumps(asdict(settings), indent=2))
        except OSError as exc:
            raise SettingsError(
                f"Could not save settings to {self.path} ({exc.strerror}). "
                "Check that the disk has space and the folder is writable."
            ) from exc

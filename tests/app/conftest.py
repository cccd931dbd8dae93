"""GUI test fixtures: offscreen Qt, one qasync loop, windows that always shut down."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import qasync  # noqa: E402
from PySide6.QtCore import QLoggingCategory  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from app.__main__ import QT_LOG_RULES  # noqa: E402
from app.main_window import MainWindow  # noqa: E402
from tests.app.fake_engine import FakeEngine, Script, fake_factory  # noqa: E402

ENGINE_THREAD = "quire-engine"
QLoggingCategory.setFilterRules(QT_LOG_RULES)


@pytest.fixture(scope="session")
def qasync_loop(qapp: QApplication) -> Iterator[asyncio.AbstractEventLoop]:
    """A qasync loop marked as running: qtbot's waits drive its callbacks and tasks."""
    loop = qasync.QEventLoop(qapp, already_running=True)
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.events._set_running_loop(None)


@pytest.fixture(autouse=True)
def no_engine_thread_left() -> Iterator[None]:
    """Fail a test that leaves an engine thread running."""
    yield
    alive = [t for t in threading.enumerate() if t.name == ENGINE_THREAD and t.is_alive()]
    assert not alive, f"test left {len(alive)} engine thread(s) running"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


WindowMaker = Callable[..., MainWindow]


@pytest.fixture
def make_window(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop, data_dir: Path
) -> Iterator[WindowMaker]:
    """Build MainWindows (fake engine by default); each is shut down after the test."""
    windows: list[MainWindow] = []

    def make(
        factory: Any = None,
        directory: Path | None = None,
        script: Script | None = None,
        created: list[FakeEngine] | None = None,
    ) -> MainWindow:
        window = MainWindow(directory or data_dir, factory or fake_factory(script, created))
        qtbot.add_widget(window)
        window.show()
        window.activateWindow()  # window shortcuts (Ctrl+N, Ctrl+M...) need the active window
        qtbot.waitUntil(window.isActiveWindow, timeout=5000)
        windows.append(window)
        return window

    yield make
    for window in windows:
        window.shutdown()

"""The window against the real engine service and the tiny demo checkpoint."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt, QTimer

from app.engine_client import real_engine
from tests.app.helpers import drop, send


def documents_ready() -> bool:
    """engine.documents lands separately; until then the engine cannot read files."""
    try:
        from engine.documents import read_document  # noqa: F401
    except ImportError:
        return False
    return True


LOAD_TIMEOUT_MS = 120_000  # the first load imports torch and writes the demo on 2 CPU cores
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "demo-model"


@pytest.fixture
def real_window(qtbot: Any, make_window: Any, demo_dir: Path) -> Any:
    window = make_window(factory=real_engine)
    window._save_settings(replace(window.settings, max_tokens=24, seed=1))
    window.client.load(demo_dir, create_demo=True, context_length=4096)
    qtbot.waitUntil(lambda: not window.model_status.is_loading, timeout=LOAD_TIMEOUT_MS)
    assert window.model_status.is_loaded, window.model_status.error
    return window


def test_demo_answer_streams_token_by_token(qtbot: Any, real_window: Any) -> None:
    window = real_window
    assert window.model_status.is_demo
    assert window.banner.isVisible() and "random" in window.banner.label.text()
    lengths: list[int] = []
    window.conversation.turn_changed.connect(
        lambda i: lengths.append(len(window.conversation.turns[i].content))
    )
    send(qtbot, window, "Hello")
    qtbot.waitUntil(
        lambda: not window.conversation.is_busy and len(window.conversation.turns) == 2,
        timeout=ANSWER_TIMEOUT_MS,
    )
    answer = window.conversation.turns[1]
    assert answer.status in ("stop", "length"), answer.error
    assert len(set(lengths)) > 3  # many distinct partial lengths: it streamed
    assert window.chat_view.views[1].answer_view.markdown == answer.content
    assert "tok/s" in window.statusBar().speed_label.text()
    qtbot.waitUntil(lambda: window.metrics.context is not None, timeout=ANSWER_TIMEOUT_MS)
    assert window.statusBar().context_label.text().endswith(" / 4,096")
    stored = window.store.messages(window.conversation.conversation_id)
    assert [m.content for m in stored] == ["Hello", answer.content]


def test_demo_stop_mid_answer(qtbot: Any, real_window: Any) -> None:
    window = real_window
    window._save_settings(replace(window.settings, max_tokens=4000))
    send(qtbot, window, "Tell me a long story")
    qtbot.waitUntil(
        lambda: (
            len(window.conversation.turns) == 2 and len(window.conversation.turns[1].content) > 0
        ),
        timeout=ANSWER_TIMEOUT_MS,
    )
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=ANSWER_TIMEOUT_MS)
    assert window.conversation.turns[1].status == "cancelled"
    assert window.chat_view.views[1].note_label.text() == "Stopped."


def test_event_loop_stays_responsive_while_generating(qtbot: Any, real_window: Any) -> None:
    window = real_window
    window._save_settings(replace(window.settings, max_tokens=40))
    ticks: list[float] = []
    timer = QTimer(interval=10)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    send(qtbot, window, "Count to a hundred")
    timer.start()
    qtbot.waitUntil(lambda: not window.conversation.is_busy, timeout=ANSWER_TIMEOUT_MS)
    timer.stop()
    assert window.conversation.turns[1].status in ("stop", "length")
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) >= 5, ticks
    assert max(gaps) < 0.5, f"GUI thread blocked for {max(gaps):.2f} s"


@pytest.mark.skipif(not documents_ready(), reason="engine.documents.read_document not there yet")
def test_drop_text_file_is_read_by_the_engine(qtbot: Any, real_window: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe launch is on Friday.\n")
    drop(real_window, [notes])
    qtbot.waitUntil(
        lambda: (
            real_window.attachments.items[0].is_read or bool(real_window.attachments.items[0].error)
        ),
        timeout=ANSWER_TIMEOUT_MS,
    )
    item = real_window.attachments.items[0]
    assert not item.error and item.num_tokens > 0


def test_real_engine_refuses_a_folder_without_a_model(
    qtbot: Any, make_window: Any, tmp_path: Path
) -> None:
    window = make_window(factory=real_engine)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    window.load_model(empty)
    qtbot.waitUntil(lambda: not window.model_status.is_loading, timeout=LOAD_TIMEOUT_MS)
    assert not window.model_status.is_loaded
    assert "not-a-model" in window.model_status.error
    assert window.banner.objectName() == "banner_error"
    assert window.model_status.error.replace("\n", "<br>") in window.banner.label.text()


def test_demo_cannot_use_4_bit_experts_and_says_so(
    qtbot: Any, real_window: Any, demo_dir: Path
) -> None:
    panel = real_window.model_panel
    panel.folder_edit.setText(str(demo_dir))
    panel.precision_combo.setCurrentIndex(panel.precision_combo.findData("int4"))
    qtbot.waitUntil(lambda: "4-bit experts" in panel.error_label.text(), timeout=ANSWER_TIMEOUT_MS)
    assert "Choose 8-bit experts" in panel.error_label.text()
    assert panel.plan_label.text() == "No plan for these settings."
    assert real_window.model_status.is_loaded  # a failed plan leaves the loaded model alone
    panel.precision_combo.setCurrentIndex(panel.precision_combo.findData("auto"))
    qtbot.waitUntil(lambda: panel.error_label.text() == "", timeout=ANSWER_TIMEOUT_MS)
    assert "Fits" in panel.plan_label.text()

"""Start-up: argv, no torch on import or while the window opens, and a real process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from app.__main__ import parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_parse_args() -> None:
    args = parse_args(["--model", "/m", "--data-dir", "/d", "--demo"])
    assert args.model == Path("/m") and args.data_dir == Path("/d") and args.demo
    assert parse_args([]).model is None


OPEN_WINDOW = textwrap.dedent("""
    import sys
    import app.main_window
    assert "torch" not in sys.modules, "import"
    from PySide6.QtWidgets import QApplication
    import qasync, asyncio
    qt = QApplication([])
    loop = qasync.QEventLoop(qt, already_running=True)
    asyncio.set_event_loop(loop)
    window = app.main_window.MainWindow(__import__("pathlib").Path(sys.argv[1]))
    window.show()
    qt.processEvents()
    print("torch" in sys.modules, "transformers" in sys.modules, window.client.is_started)
    window.shutdown()
""")


def test_opening_the_window_does_not_import_torch(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run(
        [sys.executable, "-c", OPEN_WINDOW, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]


def test_python_m_app_demo_end_to_end(tmp_path: Path) -> None:
    """A real process: opens, writes and loads the demo, closes, logs no network attempt."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    command = [
        sys.executable,
        "-m",
        "app",
        "--demo",
        "--data-dir",
        str(tmp_path),
        "--json-log",
        "--quit-after",
        "60",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("{"):
                messages.append(json.loads(line)["message"])
            if any(m.startswith("model loaded") for m in messages):
                process.terminate()  # SIGTERM closes the window like the user would
                break
        _, rest = process.communicate(timeout=60)
        messages += [
            json.loads(line)["message"] for line in rest.splitlines() if line.startswith("{")
        ]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert messages[0] == "window shown"
    assert messages[-1] == "closed; 0 network attempts refused"
    assert any(m.startswith("model loaded: demo-model") for m in messages), messages
    assert (tmp_path / "demo-model" / "config.json").is_file()
    assert (tmp_path / "settings.json").is_file()

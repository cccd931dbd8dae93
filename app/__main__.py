"""`quire` / `python -m app`: argv -> QApplication -> qasync loop -> the main window."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PySide6.QtWidgets import QWidget as QWidgetLike

QT_LOG_RULES = "qt.text.font.db.warning=false"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quire", description="Private offline assistant.")
    parser.add_argument("--model", type=Path, help="load this model folder at start")
    parser.add_argument("--demo", action="store_true", help="load the built-in demo model")
    parser.add_argument("--data-dir", type=Path, help="history and settings folder")
    parser.add_argument("--json-log", action="store_true", help="log JSON lines to stderr")
    parser.add_argument(
        "--quit-after", type=float, default=0.0, metavar="SECONDS", help=argparse.SUPPRESS
    )  # for end-to-end tests
    return parser.parse_args(argv)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                "time": record.created,
            }
        )


def setup_logging(data_dir: Path, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(LOG_FORMAT))
    handlers: list[logging.Handler] = [handler]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(data_dir / "quire.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(file_handler)
    except OSError:
        pass
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


async def run_window(args: argparse.Namespace, data_dir: Path) -> int:
    """Show the window, then start loading; return when the last window closes."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.errors import install_crash_hook
    from app.main_window import MainWindow
    from app.privacy import NetworkGuard
    from app.widgets.dialogs import CrashDialog

    app = QApplication.instance()
    assert isinstance(app, QApplication)  # created in main() before the loop
    guard = NetworkGuard().install()
    window = MainWindow(data_dir, guard=guard)

    def show_bug(text: str) -> None:
        CrashDialog(text, window).exec()

    install_crash_hook(show_bug)
    closed = asyncio.Event()
    app.lastWindowClosed.connect(closed.set)
    window.show()
    logging.getLogger("app").info("window shown")
    QTimer.singleShot(0, functools.partial(window.start, args.model, args.demo))
    _close_on_signals(window)
    if args.quit_after > 0:
        QTimer.singleShot(int(args.quit_after * 1000), window.close)
    await closed.wait()
    window.shutdown()
    logging.getLogger("app").info("closed; %d network attempts refused", guard.num_attempts)
    return 0


def _close_on_signals(window: QWidgetLike) -> None:
    """Ctrl+C and SIGTERM close the window properly (history saved, engine stopped)."""
    from PySide6.QtCore import QTimer

    def close(*_args: object) -> None:
        QTimer.singleShot(0, window.close)

    signal.signal(signal.SIGINT, close)
    signal.signal(signal.SIGTERM, close)
    # Python runs signal handlers only between bytecodes: wake it up now and then.
    wake = QTimer(window, interval=250)
    wake.timeout.connect(lambda: None)
    wake.start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import qasync
    from PySide6.QtCore import QLoggingCategory
    from PySide6.QtWidgets import QApplication

    from app.settings import APP_NAME, SettingsFile, default_data_dir
    from app.theme import app_icon, apply_theme

    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    setup_logging(data_dir, args.json_log)
    # Random demo text mixes scripts that the bundled fonts lack: Qt warns for each.
    QLoggingCategory.setFilterRules(QT_LOG_RULES)
    app = QApplication(sys.argv[:1])
    app.setApplicationName(APP_NAME)
    app.setWindowIcon(app_icon())
    app.setQuitOnLastWindowClosed(False)  # the coroutine decides when to stop
    settings = SettingsFile(data_dir).load()
    apply_theme(app, settings.theme, settings.font_size)
    with asyncio.Runner(loop_factory=qasync.QEventLoop) as runner:
        return runner.run(run_window(args, data_dir))


if __name__ == "__main__":
    sys.exit(main())

"""App-side expected errors, engine failure wording, and the hook that catches bugs."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class AppError(Exception):
    """Base of expected app failures; `user_message` says what happened and what to do."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


class StoreError(AppError):
    """The history database cannot be opened or written."""


class SettingsError(AppError):
    """The settings file cannot be read or written."""


# What to do next, per engine failure kind (the engine's own message comes first).
_ADVICE = {
    "CheckpointError": "Choose another model folder in the model panel (Ctrl+M).",
    "NoModelError": "Load a model first: open the model panel (Ctrl+M) or try the demo.",
    "OutOfMemoryError": "Lower the VRAM budget or the context length in the model panel.",
    "UnsupportedFileError": "Remove the file, or convert it to PDF, DOCX, TXT or an image.",
    "DocumentError": "Remove the file and try another copy of it.",
    "InputError": "Shorten the message or remove an attachment, then send again.",
    "InternalError": "Your conversation is saved. Try again; report this if it repeats.",
}

# Instead, when a model's plan or load failed.
_MODEL_ADVICE = {
    "InputError": "Change the settings in the model panel (Ctrl+M), then check the plan again.",
    "OutOfMemoryError": (
        "Lower the VRAM budget or the context length, or choose 4-bit expert precision, "
        "in the model panel (Ctrl+M)."
    ),
}


def describe_failure(kind: str, user_message: str, *, about_model: bool = False) -> str:
    """Return the text shown for an engine `Failed` event: the message plus what to do.

    `about_model`: the failure is of a model plan or load (advice points at the model panel).
    """
    advice = (about_model and _MODEL_ADVICE.get(kind)) or _ADVICE.get(kind, "")
    if not advice or advice in user_message:
        return user_message
    return f"{user_message}\n\n{advice}"


BugHandler = Callable[[str], None]


def install_crash_hook(show: BugHandler) -> None:
    """Route uncaught exceptions (bugs) to the log and to `show`, instead of killing the app."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        log.error("uncaught exception:\n%s", text)
        try:
            show(text)
        except Exception:  # the dialog itself failed: the log already has the traceback
            log.exception("crash dialog failed")

    sys.excepthook = hook

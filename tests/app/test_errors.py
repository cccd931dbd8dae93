"""Error wording and the crash hook."""

from __future__ import annotations

import sys

import pytest

from app.errors import AppError, SettingsError, StoreError, describe_failure, install_crash_hook


def test_describe_failure_adds_what_to_do() -> None:
    text = describe_failure("OutOfMemoryError", "The GPU ran out of memory.")
    assert text.startswith("The GPU ran out of memory.") and "VRAM budget" in text
    assert describe_failure("SomethingNew", "As is.") == "As is."


@pytest.mark.parametrize("cls", [StoreError, SettingsError])
def test_app_errors_carry_a_user_message(cls: type[AppError]) -> None:
    error = cls("Free some disk space.")
    assert isinstance(error, AppError) and error.user_message == "Free some disk space."


def test_crash_hook_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[str] = []
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    install_crash_hook(shown.append)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert "ValueError: boom" in shown[0] and "Traceback" in shown[0]


def test_model_failures_point_at_the_model_panel() -> None:
    message = "4-bit experts (host format int4) need ... Choose 8-bit experts."
    text = describe_failure("InputError", message, about_model=True)
    assert text.startswith(message) and "model panel (Ctrl+M)" in text and "Shorten" not in text
    assert "Shorten the message" in describe_failure("InputError", "The message is empty.")
    text = describe_failure("OutOfMemoryError", "Does not fit.", about_model=True)
    assert "VRAM budget" in text and "4-bit expert precision" in text
    assert describe_failure("SomethingNew", "As is.", about_model=True) == "As is."

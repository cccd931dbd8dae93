"""Expected engine failures: each carries a sentence telling the user what to do."""

from __future__ import annotations


class QuireError(Exception):
    """Base of every expected failure; `user_message` is shown to the user as is."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


class CheckpointError(QuireError):
    """The model folder is missing, incomplete, corrupt or not a Mistral Small 4 checkpoint."""


class InputError(QuireError):
    """A request the engine cannot serve as given: empty prompt, too long, bad image."""


class UnsupportedFileError(QuireError):
    """A dropped file of a type Quire cannot read."""


class DocumentError(QuireError):
    """A document that could not be read: corrupt, encrypted, empty or too large."""


class OutOfMemoryError(QuireError):
    """GPU or host memory ran out; the message proposes a smaller plan."""


class NoModelError(QuireError):
    """A request that needs a loaded model arrived before one was loaded."""


class CancelledError(QuireError):
    """The user cancelled the work in progress."""

    def __init__(self, user_message: str = "Cancelled.") -> None:
        super().__init__(user_message)

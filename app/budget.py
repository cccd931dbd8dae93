"""The context budget: does the next message fit, and what would a narrower choice cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Signal, Slot

from app.engine_client import EngineClient
from app.errors import describe_failure
from app.settings import Settings
from app.state import Attachment, ConversationState, Metrics, Turn


def count_draft(client: EngineClient, state: ConversationState, settings: Settings, draft: str,
                items: list[Attachment]) -> str:
    """Ask the engine to count the conversation plus `draft` with `items`; returns the request id."""
    turns = [*state.turns, Turn("user", draft, attachments=list(items))]
    return client.count_tokens(turns, system_prompt=settings.system_prompt, effort=state.effort,
                               max_tokens=settings.max_tokens)


class BudgetController(QObject):
    """Counts candidate messages for the budget dialog; only the latest count is reported."""

    counted = Signal(object)  # the engine's TokenCount
    failed = Signal(str)

    def __init__(
        self,
        client: EngineClient,
        state: ConversationState,
        metrics: Metrics,
        settings: Callable[[], Settings],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.client, self.state, self.metrics, self._settings = client, state, metrics, settings
        self._count_id = ""
        client.token_count.connect(self.on_client_token_count)
        client.failed.connect(self.on_client_failed)

    def is_over(self) -> bool:
        """True when the latest count of the draft says it does not fit."""
        count = self.metrics.context
        return count is not None and not count.fits

    def recount(self, draft: str, items: list[Attachment]) -> None:
        """Count what sending `draft` with `items` (pages as chosen) would take."""
        self._count_id = count_draft(self.client, self.state, self._settings(), draft, items)

    @Slot(str, object)
    def on_client_token_count(self, request_id: str, count: Any) -> None:
        if request_id and request_id == self._count_id:
            self._count_id = ""
            self.counted.emit(count)

    @Slot(str, str, str)
    def on_client_failed(self, request_id: str, kind: str, user_message: str) -> None:
        if request_id and request_id == self._count_id:
            self._count_id = ""
            self.failed.emit(describe_failure(kind, user_message))

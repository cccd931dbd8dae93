"""The budget controller: is the draft over, and counts of narrower choices."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from app.budget import BudgetController
from app.engine_client import EngineClient
from app.settings import Settings
from app.state import Attachment, ConversationState, Metrics, ModelStatus
from engine import api
from tests.app.fake_engine import FakeEngine, Script, fake_factory
from tests.app.helpers import TIMEOUT_MS


def make(script: Script, created: list[FakeEngine]) -> BudgetController:
    client = EngineClient(ModelStatus(), fake_factory(script, created))
    return BudgetController(client, ConversationState(), Metrics(), lambda: Settings())


def test_is_over_follows_the_latest_count() -> None:
    budget = make(Script(), [])
    assert not budget.is_over()
    budget.metrics.set_context(api.TokenCount("r", 9000, 4096, (), False))
    assert budget.is_over()
    budget.metrics.set_context(api.TokenCount("r", 900, 4096, (), True))
    assert not budget.is_over()


def test_recount_sends_the_chosen_pages(qtbot: Any, qasync_loop: asyncio.AbstractEventLoop) -> None:
    created: list[FakeEngine] = []
    budget = make(Script(num_doc_pages=50, page_tokens=100), created)
    item = Attachment(Path("r.txt"), "document", pages="1-5")
    try:
        with qtbot.wait_signal(budget.counted, timeout=TIMEOUT_MS) as blocker:
            budget.recount("draft", [item])
        assert blocker.args[0].parts[0] == api.TokenCountPart("document r.txt", 500)
        [request] = created[0].submitted
        assert request.messages[-1].content == "draft"
        assert request.messages[-1].document_pages == ("1-5",)
    finally:
        budget.client.close()


def test_a_failed_count_is_reported(qtbot: Any, qasync_loop: asyncio.AbstractEventLoop) -> None:
    script = Script(failures={"CountTokens": ("InputError", "r.txt has pages 1-5.")})
    budget = make(script, [])
    try:
        with qtbot.wait_signal(budget.failed, timeout=TIMEOUT_MS) as blocker:
            budget.recount("draft", [])
        assert "r.txt has pages 1-5." in blocker.args[0]
    finally:
        budget.client.close()

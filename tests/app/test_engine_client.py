"""The engine client: requests it builds, and events it routes to signals and state."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from app.engine_client import EngineClient, to_messages
from app.state import Attachment, ModelStatus, Turn
from engine import api
from tests.app.fake_engine import FakeEngine, fake_factory
from tests.app.helpers import TIMEOUT_MS


def test_to_messages_splits_attachments() -> None:
    turn = Turn(
        "user",
        "look",
        attachments=[Attachment(Path("a.png"), "image"), Attachment(Path("b.pdf"), "document")],
    )
    [message] = to_messages([turn])
    assert message == api.ChatMessage("user", "look", (Path("a.png"),), (Path("b.pdf"),))


def test_engine_starts_on_first_request_and_closes(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop
) -> None:
    created: list[FakeEngine] = []
    client = EngineClient(ModelStatus(), fake_factory(created=created))
    assert not client.is_started and created == []
    with qtbot.wait_signal(client.finished, timeout=TIMEOUT_MS) as finished:
        rid = client.query_resources()
    assert finished.args == [rid, "stop"]
    assert created[0].is_running
    client.close()
    assert not created[0].is_running and not client.is_started


def test_ask_builds_the_request(qtbot: Any, qasync_loop: asyncio.AbstractEventLoop) -> None:
    created: list[FakeEngine] = []
    client = EngineClient(ModelStatus(), fake_factory(created=created))
    sampling = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 64, "seed": 3}
    with qtbot.wait_signal(client.finished, timeout=TIMEOUT_MS):
        rid = client.ask(
            [Turn("user", "hi")],
            system_prompt="sys",
            effort="high",
            sampling=sampling,
            session="c1",
        )
    ask = created[0].submitted[0]
    assert (ask.request_id, ask.system_prompt, ask.reasoning_effort, ask.session) == (
        rid,
        "sys",
        "high",
        "c1",
    )
    assert ask.sampling == api.SamplingParams(0.0, 0.9, 64, 3)
    client.close()


def test_load_events_update_model_status(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop
) -> None:
    status = ModelStatus()
    client = EngineClient(status, fake_factory())
    states: list[str] = []
    status.state_changed.connect(states.append)
    client.load(Path("/m"), create_demo=True)
    qtbot.waitUntil(lambda: not status.is_loading, timeout=TIMEOUT_MS)
    assert status.is_loaded and status.is_demo
    assert states[0] == "loading" and states[-1] == "idle"
    client.close()


def test_to_messages_carries_chosen_pages() -> None:
    docs = [
        Attachment(Path("a.pdf"), "document", pages="1-20,25"),
        Attachment(Path("p.png"), "image"),
        Attachment(Path("b.md"), "document"),
    ]
    [message] = to_messages([Turn("user", "q", attachments=docs)])
    assert message.documents == (Path("a.pdf"), Path("b.md"))
    assert message.document_pages == ("1-20,25", "")
    [plain] = to_messages([Turn("user", "q", attachments=[docs[2]])])
    assert plain.document_pages == ()


def test_citations_checked_become_app_citations(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop
) -> None:
    from app.citations import Citation

    client = EngineClient(ModelStatus(), fake_factory())
    check = api.CitationCheck("[p. 2]", Path("r.pdf"), 2, "q", False, "fuzzy", 3, 9)
    with qtbot.wait_signal(client.citations_checked) as blocker:
        client._dispatch(api.CitationsChecked("r7", (check,)))
    assert blocker.args == ["r7", [Citation("[p. 2]", Path("r.pdf"), 2, "q", False, "fuzzy", 3, 9)]]


def test_read_page_round_trip(qtbot: Any, qasync_loop: asyncio.AbstractEventLoop) -> None:
    from tests.app.fake_engine import Script

    created: list[FakeEngine] = []
    client = EngineClient(ModelStatus(), fake_factory(Script(page_texts={4: "four"}), created))
    with qtbot.wait_signal(client.page_text, timeout=TIMEOUT_MS) as blocker:
        rid = client.read_page(Path("doc.txt"), 4)
    assert blocker.args[0] == rid and blocker.args[1].text == "four"
    assert created[0].submitted == [api.ReadPage(rid, Path("doc.txt"), 4)]
    client.close()

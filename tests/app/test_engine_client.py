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


def test_plan_and_load_carry_the_expert_precision(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop
) -> None:
    created: list[FakeEngine] = []
    status = ModelStatus()
    client = EngineClient(status, fake_factory(created=created))
    client.plan(Path("/m"), None, 8192)
    client.plan(Path("/m"), 24 * 2**30, 8192, "int4")
    client.load(Path("/m"), gpu_budget_bytes=24 * 2**30, host_format="int4")
    qtbot.waitUntil(lambda: not status.is_loading, timeout=TIMEOUT_MS)
    plans = [r for r in created[0].submitted if isinstance(r, api.PlanModel)]
    assert [(p.gpu_budget_bytes, p.host_format) for p in plans] == [
        (None, "auto"),
        (24 * 2**30, "int4"),
    ]
    [load] = [r for r in created[0].submitted if isinstance(r, api.LoadModel)]
    assert (load.model_dir, load.gpu_budget_bytes, load.host_format) == (
        Path("/m"),
        24 * 2**30,
        "int4",
    )
    client.close()


def test_a_failed_plan_drops_the_last_one_and_a_good_plan_clears_the_error(
    qtbot: Any, qasync_loop: asyncio.AbstractEventLoop
) -> None:
    from tests.app.fake_engine import Script

    status = ModelStatus()
    client = EngineClient(status, fake_factory(Script(int4_error="No 4-bit here.")))
    plans: list[Any] = []
    status.plan_changed.connect(plans.append)
    client.plan(Path("/m"), None, 8192)
    qtbot.waitUntil(lambda: status.plan is not None, timeout=TIMEOUT_MS)
    with qtbot.wait_signal(status.load_failed, timeout=TIMEOUT_MS):
        client.plan(Path("/m"), None, 8192, "int4")
    assert status.plan is None and plans[-1] is None
    assert status.error.startswith("No 4-bit here.") and "model panel" in status.error
    with qtbot.wait_signal(status.state_changed, timeout=TIMEOUT_MS):
        client.plan(Path("/m"), None, 8192, "auto")
    assert status.error == "" and status.plan is plans[-1] and plans[-1].fits
    client.close()

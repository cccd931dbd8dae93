"""A scripted stand-in for engine.service.AsyncEngine: same interface, replays events.

Used only for what the demo checkpoint cannot produce on demand: failures, slow streams,
load progress with a known shape, reasoning text with code for screenshots.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import api

# What the engine's plan says the other expert precision would cache (engine.planning).
FOUR_BIT_HINT = ("With 4-bit experts (faster, less exact): 1,420 of 4,608 experts cached on the GPU, "
                 "against 798 now.")
EIGHT_BIT_HINT = "With 8-bit experts (more exact): 798 of 4,608 experts cached on the GPU, against 1,420 now."
REASONING = "The user greets me. I should answer briefly, then show a code example."
ANSWER = (
    "Hello! Here is **bold** text and a list:\n\n- one\n- two\n\n"
    "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\n\nDone."
)


@dataclass
class Script:
    """What the fake answers. `failures` maps a request class name to (kind, message)."""

    answer: str = ANSWER
    reasoning: str = REASONING
    delay_s: float = 0.002  # between events
    chunk: int = 4  # characters per delta
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    context_length: int = 4096
    citations: tuple[api.CitationCheck, ...] = ()  # sent before Finished when documents are asked
    num_doc_pages: int = 1  # what ReadDocument says a document has
    page_tokens: int = 0  # CountTokens: tokens per included document page
    document_note: str = ""  # ReadDocument's note (e.g. a scanned PDF)
    page_texts: dict[int, str] = field(default_factory=dict)  # ReadPage answers, by page
    int4_error: str = ""  # as a model that cannot use 4-bit experts: plans/loads asking fail


class FakeEngine:
    def __init__(self, loop: asyncio.AbstractEventLoop, script: Script | None = None) -> None:
        self.loop = loop
        self.script = script or Script()
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.submitted: list[Any] = []
        self.is_running = False
        self._loads: set[str] = set()
        self._cancelled: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.is_running = True

    def close(self, timeout: float = 30.0) -> None:
        for task in self._tasks:
            task.cancel()
        self.is_running = False

    def submit(self, request: Any) -> None:
        self.submitted.append(request)
        if isinstance(request, api.Cancel):
            self._cancelled.add(request.target_id)
            self.events.put_nowait(api.Finished(request.request_id, "stop"))
            return
        name = type(request).__name__
        failure = self.script.failures.get(name)
        if getattr(request, "host_format", "auto") == "int4" and self.script.int4_error:
            failure = ("InputError", self.script.int4_error)
        if failure is not None:
            kind, message = failure
            events: list[Any] = [
                api.Failed(request.request_id, kind, message),
                api.Finished(request.request_id, "error"),
            ]
            if name == "LoadModel":
                events.insert(0, api.StateChanged(request.request_id, "loading"))
        else:
            events = getattr(self, f"_{name}")(request)
        self._tasks.append(self.loop.create_task(self._play(request.request_id, events)))

    async def _play(self, request_id: str, events: list[Any]) -> None:
        for event in events:
            await asyncio.sleep(self.script.delay_s)
            if request_id in self._cancelled:
                # As the worker: a cancelled load leaves no model (in this fake).
                state = "unloaded" if request_id in self._loads else "idle"
                self.events.put_nowait(api.StateChanged(request_id, state))
                self.events.put_nowait(api.Finished(request_id, "cancelled"))
                return
            self.events.put_nowait(event)

    # ------------------------------------------------------------------ scripts
    def _PlanModel(self, req: api.PlanModel) -> list[Any]:
        parts = (
            api.PlanPart("cuda:0", "dense layers 0-35", 5 * 2**30),
            api.PlanPart("cuda:0", "expert cache (712 slots)", 17 * 2**30),
            api.PlanPart("cpu", "routed experts (pinned)", 116 * 2**30),
        )
        return [
            api.PlanReady(
                req.request_id,
                req.model_dir,
                True,
                "Fits one GPU with experts offloaded to host memory.",
                parts,
                116 * 2**30,
                22 * 2**30,
                FOUR_BIT_HINT if req.host_format != "int4" else EIGHT_BIT_HINT,
            ),
            api.Finished(req.request_id, "stop"),
        ]

    def _LoadModel(self, req: api.LoadModel) -> list[Any]:
        rid, total = req.request_id, 8 * 2**30
        events: list[Any] = [api.StateChanged(rid, "loading")]
        events += [
            api.LoadProgress(rid, total * i // 10, total, "reading weights", 0.5 * i)
            for i in range(1, 11)
        ]
        self._loads.add(rid)
        events += [
            api.ModelLoaded(
                rid,
                req.model_dir,
                "fake-mistral",
                self.script.context_length,
                "cpu; all experts resident",
                req.create_demo,
                True,
                api.REASONING_EFFORTS,
            ),
            api.StateChanged(rid, "idle"),
            api.Finished(rid, "stop"),
        ]
        return events

    def _UnloadModel(self, req: api.UnloadModel) -> list[Any]:
        return [api.StateChanged(req.request_id, "unloaded"), api.Finished(req.request_id, "stop")]

    def _chunks(self, text: str) -> list[str]:
        size = self.script.chunk
        return [text[i : i + size] for i in range(0, len(text), size)]

    def _Ask(self, req: api.Ask) -> list[Any]:
        rid = req.request_id
        events: list[Any] = [
            api.StateChanged(rid, "prefill"),
            api.PrefillProgress(rid, 10, 10),
            api.StateChanged(rid, "generating"),
        ]
        if req.reasoning_effort == "high":
            events += [api.ReasoningDelta(rid, c) for c in self._chunks(self.script.reasoning)]
        events += [api.AnswerDelta(rid, c) for c in self._chunks(self.script.answer)]
        events.append(api.Stats(rid, 10, 0, 20, 0.12, 850.0, 23.5, 90, 10, 0.9))
        if self.script.citations and any(m.documents for m in req.messages):
            events.append(api.CitationsChecked(rid, self.script.citations))
        events += [
            api.StateChanged(rid, "idle"),
            api.Finished(rid, "stop"),
        ]
        return events

    def _CountTokens(self, req: api.CountTokens) -> list[Any]:
        parts = tuple(self._document_parts(req.messages)) + (
            api.TokenCountPart("history", 40),
            api.TokenCountPart("answer reserve", req.max_tokens),
        )
        total = sum(p.num_tokens for p in parts)
        return [
            api.TokenCount(
                req.request_id,
                total,
                self.script.context_length,
                parts,
                total <= self.script.context_length,
            ),
            api.Finished(req.request_id, "stop"),
        ]

    def _document_parts(self, messages: tuple[api.ChatMessage, ...]) -> list[Any]:
        """Each document costs page_tokens per included page ("1-10,12" -> 11 pages)."""
        parts = []
        for message in messages:
            for index, path in enumerate(message.documents):
                spec = message.document_pages[index] if message.document_pages else ""
                num_pages = self.script.num_doc_pages
                if spec:
                    num_pages = sum(_range_size(r) for r in spec.split(","))
                tokens = num_pages * self.script.page_tokens
                parts.append(api.TokenCountPart(f"document {Path(path).name}", tokens))
        return parts

    def _ReadDocument(self, req: api.ReadDocument) -> list[Any]:
        path = Path(req.path)
        kind = "image" if path.suffix.lower() in (".png", ".jpg", ".jpeg") else "text"
        pages = 1 if kind == "image" else self.script.num_doc_pages
        return [
            api.DocumentRead(
                req.request_id,
                path,
                kind,
                pages,
                12,
                path.stat().st_size,
                self.script.document_note,
            ),
            api.Finished(req.request_id, "stop"),
        ]

    def _ReadPage(self, req: api.ReadPage) -> list[Any]:
        rid = req.request_id
        if req.page not in self.script.page_texts:
            message = f"{Path(req.path).name} has no page {req.page}."
            return [api.Failed(rid, "InputError", message), api.Finished(rid, "error")]
        text = self.script.page_texts[req.page]
        return [
            api.PageText(rid, req.path, req.page, f"p. {req.page}", text),
            api.Finished(rid, "stop"),
        ]

    def _QueryResources(self, req: api.QueryResources) -> list[Any]:
        return [
            api.ResourceUsage(req.request_id, (2 * 2**30,), (24 * 2**30,), 9 * 2**30, 64 * 2**30),
            api.Finished(req.request_id, "stop"),
        ]


def _range_size(part: str) -> int:
    low, _, high = part.strip().partition("-")
    return int(high or low) - int(low) + 1


def fake_factory(script: Script | None = None, created: list[FakeEngine] | None = None) -> Any:
    """An `EngineFactory` that builds FakeEngines (appended to `created` when given)."""

    def build(loop: asyncio.AbstractEventLoop) -> FakeEngine:
        engine = FakeEngine(loop, script)
        if created is not None:
            created.append(engine)
        return engine

    return build

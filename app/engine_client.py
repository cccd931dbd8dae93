"""The asyncio side of engine.service: builds requests, pumps events into Qt signals.

The only app module that imports the engine (its `api` and `service` modules). The engine
thread starts on the first request, so opening the window never imports torch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from PySide6.QtCore import QObject, Signal

from app.citations import Citation
from app.errors import describe_failure
from app.state import ModelStatus, Turn
from engine import api
from engine.service import AsyncEngine

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What `AsyncEngine` offers; the tests' fake engine satisfies it too."""

    events: asyncio.Queue[Any]

    def start(self) -> None: ...
    def submit(self, request: Any) -> None: ...
    def close(self, timeout: float = 30.0) -> None: ...


EngineFactory = Callable[[asyncio.AbstractEventLoop], EngineLike]


def real_engine(loop: asyncio.AbstractEventLoop) -> EngineLike:
    return AsyncEngine(loop)


_MODEL_EVENTS = (api.PlanReady, api.LoadProgress, api.ModelLoaded, api.ResourceUsage)


class EngineClient(QObject):
    """Submits requests and turns the engine's events into signals.

    Model events update `model_status`; answer events are re-emitted with their request id.
    """

    answer_delta = Signal(str, str)  # request_id, text
    reasoning_delta = Signal(str, str)
    prefill_progress = Signal(str, int, int)
    stats_received = Signal(str, object)
    token_count = Signal(str, object)
    document_read = Signal(str, object)
    citations_checked = Signal(str, object)  # request_id, list[Citation]
    page_text = Signal(str, object)  # request_id, PageText (path, page, label, text)
    failed = Signal(str, str, str)  # request_id, kind, user_message
    finished = Signal(str, str)  # request_id, reason

    def __init__(
        self,
        model_status: ModelStatus,
        factory: EngineFactory = real_engine,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.model_status = model_status
        self._factory = factory
        self._engine: EngineLike | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._load_id = ""
        self._plan_id = ""

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_started(self) -> bool:
        return self._engine is not None

    def _ensure_started(self) -> EngineLike:
        if self._engine is None:
            loop = asyncio.get_event_loop()
            self._engine = self._factory(loop)
            self._engine.start()
            self._pump = loop.create_task(self._pump_events(self._engine))
        return self._engine

    def close(self) -> None:
        """Stop the engine thread (bounded wait) and the event pump."""
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    async def _pump_events(self, engine: EngineLike) -> None:
        while True:
            event = await engine.events.get()
            try:
                self._dispatch(event)
            except Exception:  # a bug in a slot must not stop the pump
                log.exception("handling %r failed", event)

    def _submit(self, make: Callable[[str], Any]) -> str:
        request_id = f"r{next(self._ids)}"
        self._ensure_started().submit(make(request_id))
        return request_id

    # ------------------------------------------------------------------ requests
    def plan(
        self,
        model_dir: Path,
        gpu_budget_bytes: int | None,
        context_length: int,
        host_format: str = "auto",
    ) -> str:
        """Validate a folder and compute its placement plan; failures go to model_status.

        `host_format` is how the offloaded experts would be held: "auto" (8-bit) or "int4".
        """
        self._plan_id = self._submit(
            lambda rid: api.PlanModel(
                rid,
                model_dir,
                gpu_budget_bytes=gpu_budget_bytes,
                context_length=context_length,
                host_format=host_format,
            )
        )
        return self._plan_id

    def load(
        self,
        model_dir: Path,
        *,
        create_demo: bool = False,
        gpu_budget_bytes: int | None = None,
        context_length: int = 32768,
        host_format: str = "auto",
        snapshot_dir: Path | None = None,
    ) -> str:
        """Load a model folder (or write and load the demo); progress goes to model_status."""
        self.model_status.is_loading = True
        self.model_status.error = ""
        self._load_id = self._submit(
            lambda rid: api.LoadModel(
                rid,
                model_dir,
                gpu_budget_bytes=gpu_budget_bytes,
                context_length=context_length,
                host_format=host_format,
                create_demo=create_demo,
                snapshot_dir=snapshot_dir,
            )
        )
        self.model_status.set_state("loading")
        return self._load_id

    def cancel_load(self) -> None:
        if self._load_id:
            self.cancel(self._load_id)

    def unload(self) -> str:
        return self._submit(api.UnloadModel)

    def query_resources(self) -> str:
        return self._submit(api.QueryResources)

    def read_document(self, path: Path) -> str:
        return self._submit(lambda rid: api.ReadDocument(rid, path))

    def read_page(self, path: Path, page: int) -> str:
        """Ask for one page's text; answered by `page_text` (or `failed`), then `finished`."""
        return self._submit(lambda rid: api.ReadPage(rid, path, page))

    def cancel(self, target_id: str) -> None:
        if self._engine is not None:
            self._submit(lambda rid: api.Cancel(rid, target_id))

    def ask(
        self,
        turns: Sequence[Turn],
        *,
        system_prompt: str,
        effort: str,
        sampling: dict[str, Any],
        session: str,
    ) -> str:
        """Ask for the next assistant turn after `turns`.

        Args:
            turns: the conversation so far, ending with the user's message.
            system_prompt: text put before the conversation.
            effort: "none" or "high".
            sampling: temperature, top_p, max_tokens, seed.
            session: the conversation id (keys the engine's cached prefix).
        Returns:
            The request id that the answer's signals carry.
        """
        messages = to_messages(turns)
        params = api.SamplingParams(**sampling)
        return self._submit(
            lambda rid: api.Ask(
                rid,
                messages,
                system_prompt=system_prompt,
                reasoning_effort=effort,
                sampling=params,
                session=session,
            )
        )

    def count_tokens(
        self, turns: Sequence[Turn], *, system_prompt: str, effort: str, max_tokens: int
    ) -> str:
        messages = to_messages(turns)
        return self._submit(
            lambda rid: api.CountTokens(
                rid,
                messages,
                system_prompt=system_prompt,
                reasoning_effort=effort,
                max_tokens=max_tokens,
            )
        )

    # ------------------------------------------------------------------ events
    def _dispatch(self, event: Any) -> None:
        rid = event.request_id
        if isinstance(event, _MODEL_EVENTS) or (rid and rid in (self._load_id, self._plan_id)):
            self._on_model_event(event)
        if isinstance(event, api.StateChanged):
            self.model_status.set_state(event.state)
            if event.state == "unloaded":
                self.model_status.loaded = None
                self.model_status.loaded_changed.emit()
        elif isinstance(event, api.AnswerDelta):
            self.answer_delta.emit(rid, event.text)
        elif isinstance(event, api.ReasoningDelta):
            self.reasoning_delta.emit(rid, event.text)
        elif isinstance(event, api.PrefillProgress):
            self.prefill_progress.emit(rid, event.processed, event.total)
        elif isinstance(event, api.Stats):
            self.stats_received.emit(rid, event)
        elif isinstance(event, api.TokenCount):
            self.token_count.emit(rid, event)
        elif isinstance(event, api.DocumentRead):
            self.document_read.emit(rid, event)
        elif isinstance(event, api.CitationsChecked):
            self.citations_checked.emit(rid, [to_citation(c) for c in event.citations])
        elif isinstance(event, api.PageText):
            self.page_text.emit(rid, event)
        elif isinstance(event, api.Failed):
            if event.details:
                log.error("engine bug (%s): %s", rid, event.details)
            self.failed.emit(rid, event.kind, event.user_message)
        elif isinstance(event, api.Finished):
            self.finished.emit(rid, event.reason)

    def _on_model_event(self, event: Any) -> None:
        status = self.model_status
        if isinstance(event, api.PlanReady):
            status.plan = event
            status.plan_changed.emit(event)
            if status.error and not status.is_loading:  # settings that plan fine clear it
                status.error = ""
                status.set_state(status.state)  # tells views to drop the message
        elif isinstance(event, api.LoadProgress):
            status.progress_changed.emit(event)
        elif isinstance(event, api.ModelLoaded):
            status.loaded = event
            status.loaded_changed.emit()
        elif isinstance(event, api.ResourceUsage):
            status.resources_changed.emit(event)
        elif isinstance(event, api.Failed):  # of a load or a plan
            if event.request_id == self._plan_id:
                status.plan = None  # no plan for these settings: views drop the last one
                status.plan_changed.emit(None)
            status.error = describe_failure(event.kind, event.user_message, about_model=True)
            status.load_failed.emit(status.error)
        elif isinstance(event, api.Finished) and event.request_id == self._load_id:
            status.is_loading = False
            self._load_id = ""
            state = status.state
            if state == "loading":
                state = "unloaded" if status.loaded is None else "idle"
            status.set_state(state)  # also tells views that loading is over


def to_messages(turns: Sequence[Turn]) -> tuple[api.ChatMessage, ...]:
    """App turns -> engine chat messages (attachments split into images and documents)."""
    result = []
    for turn in turns:
        images = tuple(a.path for a in turn.attachments if a.kind == "image")
        docs = [a for a in turn.attachments if a.kind == "document"]
        pages = tuple(a.pages for a in docs) if any(a.pages for a in docs) else ()
        result.append(
            api.ChatMessage(
                turn.role,
                turn.content,
                images,
                tuple(a.path for a in docs),
                turn.reasoning,
                document_pages=pages,
            )
        )
    return tuple(result)


def to_citation(check: api.CitationCheck) -> Citation:
    return Citation(
        check.text,
        check.document,
        check.page,
        check.quote,
        check.verified,
        check.status,
        check.span_start,
        check.span_end,
    )

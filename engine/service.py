"""The engine thread and its queues: the only engine module app/ imports (with engine.api).

Requests go in through a thread-safe queue; events come out through a sink callable that
runs on the engine thread (`AsyncEngine` turns that into an asyncio.Queue via
`loop.call_soon_threadsafe`). torch is imported lazily, on the engine thread only, so the
GUI opens before any heavy import.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from collections.abc import Callable

from engine import api

log = logging.getLogger(__name__)

EventSink = Callable[[api.Event], None]
THREAD_NAME = "quire-engine"


class EngineService:
    """Owns the engine thread. `submit` is safe from any thread; `sink` runs on the engine thread."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._requests: queue.Queue[api.Request] = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ caller side
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EngineService already started")
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def submit(self, request: api.Request) -> None:
        """Queue a request. A `Cancel` takes effect at once, even while a request runs."""
        if isinstance(request, api.Cancel):
            with self._cancel_lock:
                self._cancelled.add(request.target_id)
        self._requests.put(request)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything, stop the thread and wait for it (bounded)."""
        if self._thread is None:
            return
        with self._cancel_lock:
            self._cancelled.add("*")
        self._requests.put(api.Shutdown())
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("engine thread did not stop within %.0f s", timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ engine side
    def is_cancelled(self, request_id: str) -> bool:
        with self._cancel_lock:
            return request_id in self._cancelled or "*" in self._cancelled

    def _emit(self, event: api.Event) -> None:
        try:
            self._sink(event)
        except Exception:  # a broken sink must not kill the engine thread
            log.exception("event sink failed for %r", event)

    def _run(self) -> None:
        # Imported here so that importing engine.service never pulls torch into the GUI thread.
        from engine.worker import Worker

        worker = Worker(emit=self._emit, is_cancelled=self.is_cancelled)
        try:
            while True:
                request = self._requests.get()
                if isinstance(request, api.Shutdown):
                    break
                if isinstance(request, api.Cancel):
                    self._emit(api.Finished(request.request_id, "stop"))
                    continue
                if self.is_cancelled(request.request_id):
                    self._emit(api.Finished(request.request_id, "cancelled"))
                    continue
                self._handle(worker, request)
        finally:
            worker.close()

    def _handle(self, worker: object, request: api.Request) -> None:
        from engine.errors import QuireError

        try:
            worker.handle(request)  # type: ignore[attr-defined]
        except QuireError as exc:
            self._emit(api.Failed(request.request_id, type(exc).__name__, exc.user_message))
            self._emit(api.Finished(request.request_id, "error"))
        except Exception as exc:  # a bug: keep the thread alive, report with traceback
            log.exception("engine bug while handling %s", type(request).__name__)
            self._emit(
                api.Failed(
                    request.request_id,
                    "InternalError",
                    f"The engine hit an internal error ({type(exc).__name__}: {exc}). "
                    "Your conversation is saved; try again, and report this if it repeats.",
                    details=traceback.format_exc(),
                )
            )
            self._emit(api.Finished(request.request_id, "error"))
        finally:
            with self._cancel_lock:
                self._cancelled.discard(request.request_id)


class AsyncEngine:
    """The asyncio face of the engine: `submit()` requests, `await events.get()` for events."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_event_loop()
        self.events: asyncio.Queue[api.Event] = asyncio.Queue()
        self._service = EngineService(self._post)

    def _post(self, event: api.Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            pass

    def start(self) -> None:
        self._service.start()

    def submit(self, request: api.Request) -> None:
        self._service.submit(request)

    def close(self, timeout: float = 30.0) -> None:
        self._service.close(timeout)

    @property
    def is_running(self) -> bool:
        return self._service.is_running

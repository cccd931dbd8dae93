"""The chat flow: store the turn, ask the engine, stream the answer into state and store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from app.budget import count_draft
from app.citations import Citation
from app.engine_client import EngineClient
from app.errors import AppError, describe_failure
from app.settings import Settings
from app.state import Attachment, AttachmentList, ConversationState, Metrics, Turn
from app.store import Store

log = logging.getLogger(__name__)

SAVE_INTERVAL_MS = 300  # partial answers reach the disk at least this often


class ChatController(QObject):
    """Owns the request in flight for the open conversation."""

    conversations_changed = Signal()

    def __init__(
        self,
        store: Store,
        client: EngineClient,
        state: ConversationState,
        attachments: AttachmentList,
        metrics: Metrics,
        settings: Callable[[], Settings],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.store, self.client, self.state = store, client, state
        self.attachments, self.metrics, self._settings = attachments, metrics, settings
        self._request_id = ""
        self._count_id = ""
        self._started_at = 0.0
        self._save_timer = QTimer(self, singleShot=True, interval=SAVE_INTERVAL_MS)
        self._save_timer.timeout.connect(self.on_save_timer_timeout)
        client.answer_delta.connect(self.on_client_answer_delta)
        client.reasoning_delta.connect(self.on_client_reasoning_delta)
        client.stats_received.connect(self.on_client_stats_received)
        client.failed.connect(self.on_client_failed)
        client.finished.connect(self.on_client_finished)
        client.token_count.connect(self.on_client_token_count)
        client.citations_checked.connect(self.on_client_citations_checked)

    # ------------------------------------------------------------------ conversations
    def new_conversation(self) -> None:
        self.stop()
        self.state.load("", "", [], self.state.effort)

    def open_conversation(self, conversation_id: str) -> None:
        row = self.store.conversation(conversation_id)
        if row is None or conversation_id == self.state.conversation_id:
            return
        self.stop()
        turns = [
            Turn(
                m.role,
                m.content,
                m.reasoning,
                [Attachment.from_dict(a) for a in m.attachments],
                m.effort,
                "interrupted" if m.status == "streaming" else m.status,
                m.stats,
                m.error,
                m.id,
                m.citations,
            )
            for m in self.store.messages(conversation_id)
        ]
        self.state.load(row.id, row.title, turns, row.reasoning_effort)

    def rename(self, conversation_id: str, title: str) -> None:
        self._guard(lambda: self.store.rename(conversation_id, title.strip() or "Untitled"))
        if conversation_id == self.state.conversation_id:
            self.state.title = title
        self.conversations_changed.emit()

    def delete(self, conversation_id: str) -> None:
        self._guard(lambda: self.store.delete(conversation_id))
        if conversation_id == self.state.conversation_id:
            self.new_conversation()
        self.conversations_changed.emit()

    def undo_delete(self, conversation_id: str) -> None:
        self._guard(lambda: self.store.undo_delete(conversation_id))
        self.conversations_changed.emit()

    def set_effort(self, effort: str) -> None:
        self.state.set_effort(effort)
        if self.state.conversation_id:
            self._guard(lambda: self.store.set_effort(self.state.conversation_id, effort))

    def _guard(self, write: Callable[[], object]) -> bool:
        try:
            write()
        except AppError as exc:
            self.state.error_shown.emit(exc.user_message)
            return False
        return True

    # ------------------------------------------------------------------ sending
    def send(self, text: str) -> bool:
        """Store the user's turn, then ask. Returns False when nothing was sent."""
        text = text.strip()
        items = [a for a in self.attachments.items if not a.error]
        if self.state.is_busy or (not text and not items):
            return False
        if not self.state.conversation_id:
            title = (text or items[0].path.name).splitlines()[0][:60]
            if not self._guard(lambda: self._create(title)):
                return False
        self.attachments.take_all()
        turn = Turn("user", text, attachments=items, effort=self.state.effort)
        if not self._guard(lambda: self._persist_user(turn)):
            return False
        self.state.add_turn(turn)
        self._ask()
        return True

    def _create(self, title: str) -> None:
        self.state.conversation_id = self.store.create_conversation(title, self.state.effort)
        self.state.title = title
        self.conversations_changed.emit()

    def _persist_user(self, turn: Turn) -> None:
        turn.message_id = self.store.add_message(
            self.state.conversation_id,
            "user",
            turn.content,
            attachments=[a.to_dict() for a in turn.attachments],
            effort=turn.effort,
        )

    def _ask(self) -> None:
        """Add a streaming assistant turn (stored first) and submit the request."""
        history = list(self.state.turns)
        answer = Turn("assistant", effort=self.state.effort, status="streaming")
        if not self._guard(lambda: self._persist_answer(answer)):
            return
        self.state.add_turn(answer)
        settings = self._settings()
        sampling = {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_tokens": settings.max_tokens,
            "seed": settings.seed,
        }
        self._started_at = time.monotonic()
        self.state.set_busy(True)
        self._request_id = self.client.ask(
            history,
            system_prompt=settings.system_prompt,
            effort=self.state.effort,
            sampling=sampling,
            session=self.state.conversation_id,
        )

    def _persist_answer(self, answer: Turn) -> None:
        answer.message_id = self.store.add_message(
            self.state.conversation_id, "assistant", "", effort=answer.effort, status="streaming"
        )

    def stop(self) -> None:
        if self._request_id:
            self.client.cancel(self._request_id)

    def regenerate(self) -> None:
        """Drop the last answer and ask again."""
        turns = self.state.turns
        if self.state.is_busy or not turns or turns[-1].role != "assistant":
            return
        self._guard(
            lambda: self.store.delete_messages_from(
                self.state.conversation_id, turns[-1].message_id
            )
        )
        self.state.truncate(len(turns) - 1)
        self._ask()

    def edit_and_resend(self, index: int, text: str) -> bool:
        """Replace user turn `index` (and everything after it) with `text`, then ask."""
        turns = self.state.turns
        if self.state.is_busy or not 0 <= index < len(turns) or turns[index].role != "user":
            return False
        kept = [a for a in turns[index].attachments if not a.error]
        self._guard(
            lambda: self.store.delete_messages_from(
                self.state.conversation_id, turns[index].message_id
            )
        )
        self.state.truncate(index)
        for item in kept:
            self.attachments.add(item)
        return self.send(text)

    # ------------------------------------------------------------------ streaming
    def _current(self, request_id: str) -> Turn | None:
        if request_id != self._request_id or not self.state.turns:
            return None
        return self.state.turns[-1]

    @Slot(str, str)
    def on_client_answer_delta(self, request_id: str, text: str) -> None:
        self._append(request_id, text, reasoning=False)

    @Slot(str, str)
    def on_client_reasoning_delta(self, request_id: str, text: str) -> None:
        self._append(request_id, text, reasoning=True)

    def _append(self, request_id: str, text: str, reasoning: bool) -> None:
        turn = self._current(request_id)
        if turn is None:
            return
        if reasoning:
            turn.reasoning += text
        else:
            turn.content += text
        self.state.turn_changed.emit(len(self.state.turns) - 1)
        if not self._save_timer.isActive():
            self._save_timer.start()

    @Slot()
    def on_save_timer_timeout(self) -> None:
        if self.state.turns and self.state.turns[-1].role == "assistant":
            self._save_answer(self.state.turns[-1])

    def _save_answer(self, turn: Turn) -> None:
        self._guard(
            lambda: self.store.update_message(
                turn.message_id,
                content=turn.content,
                reasoning=turn.reasoning,
                status=turn.status,
                stats=turn.stats,
                error=turn.error,
                citations=turn.citations,
            )
        )

    @Slot(str, object)
    def on_client_stats_received(self, request_id: str, stats: Any) -> None:
        turn = self._current(request_id)
        if turn is None:
            return
        turn.stats = {
            "ttft_s": stats.time_to_first_token_s,
            "decode_tps": stats.decode_tokens_per_s,
            "prefill_tps": stats.prefill_tokens_per_s,
            "output_tokens": float(stats.output_tokens),
            "hit_rate": stats.expert_hit_rate,
            "seconds": time.monotonic() - self._started_at,
        }
        self.metrics.set_stats(stats)

    @Slot(str, object)
    def on_client_citations_checked(self, request_id: str, citations: list[Citation]) -> None:
        turn = self._current(request_id)
        if turn is not None:
            turn.citations = list(citations)
            self.state.turn_changed.emit(len(self.state.turns) - 1)

    @Slot(str, str, str)
    def on_client_failed(self, request_id: str, kind: str, user_message: str) -> None:
        turn = self._current(request_id)
        if turn is not None:
            turn.error = describe_failure(kind, user_message)
            self.state.turn_changed.emit(len(self.state.turns) - 1)

    @Slot(str, str)
    def on_client_finished(self, request_id: str, reason: str) -> None:
        turn = self._current(request_id)
        if turn is None:
            return
        self._request_id = ""
        self._save_timer.stop()
        turn.status = reason
        self._save_answer(turn)
        index = len(self.state.turns) - 1
        self.state.turn_changed.emit(index)
        self.state.set_busy(False)
        self.state.answer_finished.emit(index)
        self.conversations_changed.emit()

    # ------------------------------------------------------------------ context meter
    def count_context(self, draft: str) -> None:
        """Ask the engine to count what sending `draft` now would put into the context."""
        if not self.client.model_status.is_loaded or self.state.is_busy:
            return
        self._count_id = count_draft(self.client, self.state, self._settings(), draft,
                                     list(self.attachments.items))

    @Slot(str, object)
    def on_client_token_count(self, request_id: str, count: Any) -> None:
        if request_id == self._count_id:
            self.metrics.set_context(count)

"""The generation loop: chunked prefill (reusing a cached prefix), decode, sampling, stop
conditions, the reasoning/answer split of the stream (on token ids), and per-request stats.

Layered as decode_steps() -> stream() -> generate(): token ids, then text deltas, then a result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine import api
from engine.chat import END_THINK, EOS, THINK, Prompt
from engine.errors import CancelledError, InputError
from engine.kv.cache import LatentKVCache
from engine.sampling import sample

ProgressFn = Callable[[int, int], None]


@dataclass
class RunStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    output_tokens: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_prefill_done: float = 0.0
    t_first_token: float = 0.0
    t_end: float = 0.0

    def to_event(self, request_id: str, expert_counters: dict[str, float]) -> api.Stats:
        prefill_s = max(self.t_prefill_done - self.t_start, 1e-9)
        decode_s = max(self.t_end - self.t_first_token, 1e-9)
        new_prompt = self.prompt_tokens - self.cached_prompt_tokens
        return api.Stats(
            request_id=request_id, prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens, output_tokens=self.output_tokens,
            time_to_first_token_s=max(self.t_first_token - self.t_start, 0.0),
            prefill_tokens_per_s=new_prompt / prefill_s,
            decode_tokens_per_s=(self.output_tokens - 1) / decode_s if self.output_tokens > 1 else 0.0,
            expert_hits=int(expert_counters.get("hits", 0)),
            expert_misses=int(expert_counters.get("misses", 0)),
            expert_hit_rate=float(expert_counters.get("hit_rate", 0.0)),
            bytes_copied=int(expert_counters.get("bytes_copied", 0)),
        )


@dataclass
class Delta:
    kind: str  # "reasoning" | "answer"
    text: str


@dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    finish_reason: str = "stop"
    stats: RunStats = field(default_factory=RunStats)


class Generator:
    """One request against a loaded model (see engine.runtime.LoadedModel for `model`)."""

    def __init__(self, model, prompt: Prompt, params: api.SamplingParams, cache: LatentKVCache,
                 *, is_cancelled: Callable[[], bool] = lambda: False,
                 on_prefill: ProgressFn | None = None, prefill_chunk: int = 512) -> None:
        self.model, self.prompt, self.params, self.cache = model, prompt, params, cache
        self.is_cancelled, self.on_prefill = is_cancelled, on_prefill
        self.prefill_chunk = max(1, prefill_chunk)
        self.result = Result(list(prompt.ids))
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def prefill(self) -> torch.Tensor:
        """Feed the prompt tokens the cache does not hold yet; returns the last logits [1, V]."""
        ids = self.prompt.ids
        total = len(ids)
        if total + max(self.params.max_tokens, 1) > self.model.context_length:
            raise InputError(
                f"The prompt is {total:,} tokens and the answer may take {self.params.max_tokens:,} "
                f"more, but the context holds {self.model.context_length:,}. Remove a document or "
                "earlier turns, or lower the maximum answer length."
            )
        start = min(self.cache.offset, total - 1)  # at least one token must run for logits
        self.cache.trim(start)
        self.cache.reserve(total + self.params.max_tokens)
        stats = self.result.stats
        stats.prompt_tokens, stats.cached_prompt_tokens = total, start
        embeds = self.model.embed_prompt(self.prompt, start)  # [total - start, H]
        logits = None
        for lo in range(0, embeds.shape[0], self.prefill_chunk):
            if self.is_cancelled():
                raise CancelledError()
            chunk = embeds[lo : lo + self.prefill_chunk]
            try:  # a GPU chunk is seconds of work: cancel is checked before every layer
                logits = self.model.forward(chunk, self.cache, should_stop=self.is_cancelled)
            except InterruptedError:
                raise CancelledError() from None
            if self.on_prefill:
                self.on_prefill(start + lo + chunk.shape[0], total)
        stats.t_prefill_done = time.perf_counter()
        assert logits is not None
        return logits

    def decode_steps(self) -> Iterator[int]:
        """Yield sampled token ids until EOS, max tokens, or cancel."""
        logits = self.prefill()
        p = self.params
        for step in range(p.max_tokens):
            token = sample(logits, p.temperature, p.top_p, self.generator)
            if step == 0:
                self.result.stats.t_first_token = time.perf_counter()
            if token == EOS:
                self.result.finish_reason = "stop"
                return
            self.result.output_ids.append(token)
            yield token
            if self.is_cancelled():
                self.result.finish_reason = "cancelled"
                return
            if step + 1 == p.max_tokens:
                break
            logits = self.model.forward(self.model.embed_ids([token]), self.cache)
        self.result.finish_reason = "length"

    def stream(self) -> Iterator[Delta]:
        """Text deltas, reasoning ([THINK]...[/THINK]) told apart from the answer by token id."""
        fmt = self.model.formatter
        kind, segment, emitted = "answer", [], ""
        try:
            for token in self.decode_steps():
                if token in (THINK, END_THINK):
                    kind, segment, emitted = ("reasoning" if token == THINK else "answer"), [], ""
                    continue
                segment.append(token)
                text = fmt.decode(segment)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 sequence: wait for the next token
                new = text[len(emitted):]
                emitted = text
                if kind == "reasoning":
                    self.result.reasoning += new
                else:
                    self.result.text += new
                if new:
                    yield Delta(kind, new)
                    if self._hit_stop():
                        self.result.finish_reason = "stop"
                        return
        finally:
            self.result.stats.output_tokens = len(self.result.output_ids)
            self.result.stats.t_end = time.perf_counter()

    def _hit_stop(self) -> bool:
        for stop in self.params.stop:
            if stop and stop in self.result.text:
                self.result.text = self.result.text[: self.result.text.index(stop)]
                return True
        return False

    def run(self) -> Result:
        for _ in self.stream():
            pass
        return self.result

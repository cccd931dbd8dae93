"""The generation loop: sampling, reasoning/answer split on ids, stop, cancel, limits, prefix reuse."""

from __future__ import annotations

import pytest
import torch

from engine import api
from engine.chat import ChatFormatter, Prompt
from engine.errors import CancelledError, InputError
from engine.generate import Generator
from engine.kv.cache import LatentKVCache
from engine.runtime import LoadedModel, LoadOptions
from engine.sampling import sample


class ScriptedModel:
    """Emits a fixed token script through the real Generator (for behaviour the random tiny
    model cannot produce on demand, such as a [THINK] block)."""

    def __init__(self, formatter: ChatFormatter, script: list[int], context_length: int = 4096):
        self.formatter, self.script, self.context_length = formatter, list(script), context_length
        self.num_forwards = 0

    def embed_prompt(self, prompt: Prompt, start: int) -> torch.Tensor:
        return torch.zeros(len(prompt.ids) - start, 1)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return torch.zeros(len(ids), 1)

    def forward(self, embeds: torch.Tensor, cache: LatentKVCache, should_stop=None) -> torch.Tensor:
        if should_stop is not None and should_stop():  # as the decoder checks before each layer
            raise InterruptedError
        cache.commit(embeds.shape[0])
        token = self.script[min(self.num_forwards, len(self.script) - 1)]
        self.num_forwards += 1
        logits = torch.full((1, 131072), -1e4)
        logits[0, token] = 0.0
        return logits


@pytest.fixture(scope="module")
def formatter(tiny_checkpoint):
    return ChatFormatter(tiny_checkpoint)


def _cache() -> LatentKVCache:
    return LatentKVCache(1, 4, 2, torch.float32)


def _script(formatter, reasoning: str, answer: str) -> list[int]:
    return [34, *formatter.encode_text(reasoning), 35, *formatter.encode_text(answer), 2]


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9])
    assert sample(logits, 0.0, 1.0) == 1


def test_seeded_sampling_is_reproducible_and_top_p_limits_choices():
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0, -6.0])
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 0.5, gen) for _ in range(200)}
    assert picks <= {0, 1} and len(picks) == 2


def test_reasoning_and_answer_are_split_on_token_ids(formatter):
    model = ScriptedModel(formatter, _script(formatter, "Let me think: 2+2.", "It is 4."))
    prompt = Prompt(formatter.encode_text("q"))
    gen = Generator(model, prompt, api.SamplingParams(temperature=0.0, max_tokens=64), _cache())
    deltas = list(gen.stream())
    assert {d.kind for d in deltas} == {"reasoning", "answer"}
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == "Let me think: 2+2."
    assert gen.result.text == "It is 4." and gen.result.reasoning == "Let me think: 2+2."
    assert gen.result.finish_reason == "stop"
    assert 34 in gen.result.output_ids and 35 in gen.result.output_ids


def test_truncated_think_block_is_reasoning_only(formatter):
    script = [34, *formatter.encode_text("still thinking and thinking")]
    model = ScriptedModel(formatter, script)
    gen = Generator(model, Prompt([1, 3, 4]), api.SamplingParams(temperature=0.0, max_tokens=4), _cache())
    gen.run()
    assert gen.result.finish_reason == "length" and gen.result.text == "" and gen.result.reasoning


def test_stop_sequence_ends_the_answer(formatter):
    model = ScriptedModel(formatter, [*formatter.encode_text("one two STOP three four"), 2])
    params = api.SamplingParams(temperature=0.0, max_tokens=50, stop=("STOP",))
    gen = Generator(model, Prompt([1, 3, 4]), params, _cache())
    gen.run()
    assert gen.result.finish_reason == "stop" and gen.result.text == "one two "


def test_cancel_stops_within_one_step(formatter):
    model = ScriptedModel(formatter, formatter.encode_text("a b c d e f g h i j k l m n o p"))
    cancelled = {"flag": False}
    gen = Generator(model, Prompt([1, 3, 4]), api.SamplingParams(temperature=0.0, max_tokens=100),
                    _cache(), is_cancelled=lambda: cancelled["flag"])
    seen = []
    for delta in gen.stream():
        seen.append(delta)
        if len(seen) == 2:
            cancelled["flag"] = True
    assert len(seen) == 2 and gen.result.finish_reason == "cancelled"


def test_cancel_during_prefill(formatter):
    model = ScriptedModel(formatter, [5])
    gen = Generator(model, Prompt(list(range(100, 400))), api.SamplingParams(max_tokens=4), _cache(),
                    is_cancelled=lambda: True, prefill_chunk=16)
    with pytest.raises(CancelledError):
        gen.run()


def test_cancel_inside_a_prefill_chunk(formatter):
    """A GPU prefill chunk is seconds of work: a cancel arriving during it stops it there,
    and the cache keeps only what was committed before."""
    model = ScriptedModel(formatter, [5])
    calls = {"n": 0}

    def cancelled_after_first_check() -> bool:
        calls["n"] += 1
        return calls["n"] > 1  # False before the chunk, True when the model asks mid-chunk

    cache = _cache()
    gen = Generator(model, Prompt(list(range(100, 400))), api.SamplingParams(max_tokens=4), cache,
                    is_cancelled=cancelled_after_first_check, prefill_chunk=512)
    with pytest.raises(CancelledError):
        gen.run()
    assert calls["n"] == 2 and cache.offset == 0 and model.num_forwards == 0


def test_prompt_longer_than_the_context_is_refused(formatter):
    model = ScriptedModel(formatter, [5], context_length=64)
    gen = Generator(model, Prompt(list(range(100, 160))), api.SamplingParams(max_tokens=16), _cache())
    with pytest.raises(InputError, match="context holds 64"):
        gen.run()


def test_prefill_progress_is_monotone_and_ends_at_total(formatter):
    model = ScriptedModel(formatter, [2])
    seen: list[tuple[int, int]] = []
    gen = Generator(model, Prompt(list(range(100, 150))), api.SamplingParams(max_tokens=4), _cache(),
                    on_prefill=lambda d, t: seen.append((d, t)), prefill_chunk=16)
    gen.run()
    assert [d for d, _ in seen] == [16, 32, 48, 50] and all(t == 50 for _, t in seen)


def test_follow_up_reuses_the_cached_prefix_and_matches_full_prefill(tiny_checkpoint):
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32"))
    params = api.SamplingParams(temperature=0.0, max_tokens=8)
    first = [api.ChatMessage("user", "A long document would sit here. Question one?")]
    p1 = model.formatter.build(first, "", "none")
    c1 = model.cache_for("s1", p1)
    r1 = Generator(model, p1, params, c1).run()
    model.keep_cache("s1", p1, r1.output_ids, c1)
    follow = first + [api.ChatMessage("assistant", r1.text), api.ChatMessage("user", "And two?")]
    p2 = model.formatter.build(follow, "", "none")
    cached = Generator(model, p2, params, model.cache_for("s1", p2)).run()
    fresh = Generator(model, p2, params, model.decoder.new_cache()).run()
    assert cached.stats.cached_prompt_tokens >= len(p1.ids) - 1
    assert fresh.stats.cached_prompt_tokens == 0
    assert cached.output_ids == fresh.output_ids

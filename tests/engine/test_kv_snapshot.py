"""Prefix caches: a follow-up from memory or from a snapshot on disk answers exactly like a
full re-prefill; corrupt or foreign snapshots are detected and rebuilt, never used."""

from __future__ import annotations

import pytest
import torch

from engine import api
from engine.generate import Generator
from engine.kv.cache import LatentKVCache
from engine.runtime import LoadedModel, LoadOptions

PARAMS = api.SamplingParams(temperature=0.0, max_tokens=6)
DOC = "Quarterly report. " * 40


def _load(folder, snapdir, **kw) -> LoadedModel:
    return LoadedModel(folder, LoadOptions(dtype="float32", snapshot_dir=snapdir, snapshot_min_tokens=16, **kw))


def _ask(model, messages, session="s") -> tuple[list[int], int]:
    prompt = model.formatter.build(messages, "", "none")
    cache = model.cache_for(session, prompt)
    result = Generator(model, prompt, PARAMS, cache).run()
    model.keep_cache(session, prompt, result.output_ids, cache)
    if model.snapshots is not None:
        model.snapshots.flush()  # snapshots are written in the background
    return result.output_ids, result.stats.cached_prompt_tokens


def _conversation(first_answer: str) -> list[api.ChatMessage]:
    return [api.ChatMessage("user", DOC + "What is this?"), api.ChatMessage("assistant", first_answer),
            api.ChatMessage("user", "And the totals?")]


def test_cache_trim_and_state_round_trip():
    cache = LatentKVCache(2, 4, 2, torch.float32)
    for layer in range(2):
        cache.update_and_fetch(layer, torch.randn(5, 4), torch.randn(5, 2))
    cache.commit(5)
    state = cache.state()
    other = LatentKVCache(2, 4, 2, torch.float32)
    other.load_state(state)
    assert other.offset == 5 and all(torch.equal(other.state()[k], v) for k, v in state.items())
    other.trim(3)
    assert other.offset == 3 and other.state()["latent.1"].shape == (3, 4)
    assert other.nbytes == 3 * 2 * 6 * 4


def test_restored_snapshot_answers_like_a_full_prefill(tiny_checkpoint, tmp_path):
    model = _load(tiny_checkpoint, tmp_path)
    first = [api.ChatMessage("user", DOC + "What is this?")]
    out1, _ = _ask(model, first)
    assert list(tmp_path.glob("*.safetensors")), "the document prefix was not saved"
    follow = _conversation(model.formatter.decode(out1))
    fresh_model = _load(tiny_checkpoint, None)  # no snapshots: a full re-prefill
    expected, cached = _ask(fresh_model, follow, session="")
    assert cached == 0
    restarted = _load(tiny_checkpoint, tmp_path)  # a new process: only the disk has the prefix
    got, cached = _ask(restarted, follow)
    assert cached > len(DOC) // 10 and got == expected
    in_memory, cached_mem = _ask(model, follow)
    assert in_memory == expected and cached_mem >= cached


def test_corrupt_snapshot_is_rebuilt_not_used(tiny_checkpoint, tmp_path):
    model = _load(tiny_checkpoint, tmp_path)
    _ask(model, [api.ChatMessage("user", DOC + "What is this?")])
    snap = next(tmp_path.glob("*.safetensors"))
    data = bytearray(snap.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the tensor data
    snap.write_bytes(bytes(data))
    restarted = _load(tiny_checkpoint, tmp_path)
    _, cached = _ask(restarted, [api.ChatMessage("user", DOC + "What is this?")])
    assert cached == 0
    assert next(tmp_path.glob("*.safetensors")).read_bytes() != bytes(data)  # rebuilt


def test_snapshot_of_another_model_is_not_used(make_tiny, tiny_checkpoint, tmp_path):
    model = _load(tiny_checkpoint, tmp_path)
    _ask(model, [api.ChatMessage("user", DOC + "What is this?")])
    other = _load(make_tiny(seed=5), tmp_path)
    _, cached = _ask(other, [api.ChatMessage("user", DOC + "What is this?")])
    assert cached == 0


def test_budget_evicts_least_recently_used(tiny_checkpoint, tmp_path):
    model = _load(tiny_checkpoint, tmp_path, snapshot_budget_bytes=1)
    for session in ("a", "b"):
        _ask(model, [api.ChatMessage("user", DOC + "Question?")], session=session)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0] == model.snapshots.path_for("b")


@pytest.mark.parametrize("edit_at", ["last", "first"])
def test_editing_a_turn_reuses_the_longest_unchanged_prefix(tiny_checkpoint, edit_at):
    model = _load(tiny_checkpoint, None)
    convo = _conversation("It is a report.")
    _ask(model, convo)
    edited = list(convo)
    if edit_at == "last":
        edited[-1] = api.ChatMessage("user", "And the averages?")
    else:
        edited[0] = api.ChatMessage("user", "Short question?")
    prompt = model.formatter.build(edited, "", "none")
    cache = model.cache_for("s", prompt)
    original = model.formatter.build(convo, "", "none").ids
    first_difference = next(i for i, (a, b) in enumerate(zip(original, prompt.ids)) if a != b)
    assert cache.offset == first_difference
    if edit_at == "last":
        assert cache.offset > len(DOC) // 10
    else:
        assert cache.offset < len(DOC) // 10


def test_checksum_sees_a_change_in_any_piece_and_any_name(monkeypatch):
    """The bytes are checked in pieces on several threads: a flipped bit in the last piece, a
    renamed tensor or a shortened one each change the digest."""
    from engine.kv import snapshot

    monkeypatch.setattr(snapshot, "CHECKSUM_PIECE", 64)
    state = {"k": torch.arange(300, dtype=torch.int16).reshape(100, 3), "v": torch.ones(5, 7)}
    digest = snapshot.tensors_checksum(state)
    assert snapshot.tensors_checksum({n: t.clone() for n, t in state.items()}) == digest
    flipped = state["k"].clone()
    flipped[-1, -1] ^= 1
    assert snapshot.tensors_checksum({"k": flipped, "v": state["v"]}) != digest
    assert snapshot.tensors_checksum({"K": state["k"], "v": state["v"]}) != digest
    assert snapshot.tensors_checksum({"k": state["k"][:-1], "v": state["v"]}) != digest

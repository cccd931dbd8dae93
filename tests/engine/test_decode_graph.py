"""The static decode step that CUDA graphs capture (engine.model.decode_graph), run eagerly on
the CPU: the same logits as the ordinary decode path, through cache growth, offloaded experts
and prefetch. Tolerance: fp32, 1e-4 on logits (attention over the whole capacity with later
keys masked sums in another order; the masked probabilities are exactly 0)."""

from __future__ import annotations

import pytest
import torch

from engine.kv.cache import MIN_CAPACITY
from engine.model.decode_graph import DecodeSteps
from engine.runtime import LoadedModel, LoadOptions
from tests.helpers.assert_close import assert_close

FP32_ATOL = 1e-4


def _decode(model: LoadedModel, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill `prompt`, then `steps` greedy tokens one at a time: (their logits, their ids)."""
    cache = model.decoder.new_cache()
    logits = model.forward(model.embed_ids(prompt), cache)
    outs, ids = [], []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        ids.append(token)
        logits = model.forward(model.embed_ids([token]), cache)
        outs.append(logits)
    return torch.cat(outs), ids


@pytest.mark.parametrize("slots", [None, 2], ids=["resident", "offloaded"])
def test_static_steps_match_the_ordinary_path_across_cache_growth(tiny_checkpoint, slots):
    prompt = list(range(100, 100 + MIN_CAPACITY - 6))  # the cache grows a few tokens in
    plain = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=slots))
    expected, expected_ids = _decode(plain, prompt, 12)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=slots,
                                                     prefetch=slots is not None))
    model.decoder.decode_steps = DecodeSteps(model.decoder, use_graphs=False)
    ours, ids = _decode(model, prompt, 12)
    assert ids == expected_ids
    assert_close(f"static decode slots={slots}", ours, expected, FP32_ATOL)
    if slots is not None:
        assert model.experts.counters()["prefetch_issued"] > 0  # predictions came from the step
        model.close()
        plain.close()


def test_static_steps_split_over_two_targets(tiny_checkpoint):
    plain = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", num_targets=2))
    expected, _ = _decode(plain, [1, 306, 4658, 278], 6)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", num_targets=2))
    model.decoder.decode_steps = DecodeSteps(model.decoder, use_graphs=False)
    assert_close("static decode, two targets", _decode(model, [1, 306, 4658, 278], 6)[0], expected,
                 FP32_ATOL)


def test_graphs_are_only_asked_for_on_gpus(tiny_checkpoint):
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", cuda_graphs=True))
    assert model.decoder.decode_steps is None  # CPU: the ordinary path


def test_a_capacity_far_beyond_the_tokens_takes_the_ordinary_path(tiny_checkpoint):
    """After a long session is trimmed to a short prefix, attending the whole capacity would
    waste work: that token goes the ordinary way, and nothing keeps the cache alive after."""
    from engine.model.decode_graph import STATIC_MIN_CAPACITY

    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32"))
    steps = DecodeSteps(model.decoder, use_graphs=False)
    cache = model.decoder.new_cache()
    cache.reserve(4 * STATIC_MIN_CAPACITY)
    assert not steps.begin(cache)
    small = model.decoder.new_cache()
    assert steps.begin(small) and steps._cache is small
    steps.end()
    assert steps._cache is None


def test_captured_step_sets_are_kept_per_cache_buffers(tiny_checkpoint, monkeypatch):
    """Switching between conversations reuses their captured steps; the oldest set goes."""
    from engine.model import decode_graph

    monkeypatch.setattr(decode_graph, "GRAPH_SETS", 2)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32"))
    steps = DecodeSteps(model.decoder, use_graphs=False)
    caches = [model.decoder.new_cache() for _ in range(3)]
    for cache in caches:
        assert steps.begin(cache)
    assert list(steps._sets) == [caches[1].buffer_ids(), caches[2].buffer_ids()]
    steps._captured[0] = "captured for caches[2]"
    assert steps.begin(caches[1]) and steps._captured == {}
    assert steps.begin(caches[2]) and steps._captured == {0: "captured for caches[2]"}


def test_fused_layer_end_keeps_decode_bit_identical(tiny_checkpoint, monkeypatch, dequantised_cpu_misses):
    """The GPU's decode step ends a layer in one combine launch when the grouped kernel served
    every expert. Its bookkeeping on the CPU, both kernels replaced by their eager definitions:
    the router columns and weights reach the combine in id order, so the bf16 logits equal the
    resident engine's bit for bit, and steps with a CPU miss or an evicted hit take the plain sum."""
    from engine.experts import combine_kernel, fp8_kernel, offload
    from engine.experts.compute import dequant_expert, expert_forward

    def eager_grouped(x, gate_up_slots, down_slots, slot_ids, gate_up_scales, down_scales,
                      expert_ids):  # the layer's scale tables, read at expert_ids
        return torch.stack([expert_forward(x, *dequant_expert(
            gate_up_slots[s], gate_up_scales[e], down_slots[s], down_scales[e], torch.bfloat16))
            for s, e in zip(slot_ids.tolist(), expert_ids.tolist(), strict=True)])

    fused = []

    def eager_combine(ys, weights, order, shared, h):
        fused.append(len(order))
        return combine_kernel.eager_combine(ys, weights, order.tolist(), shared, h)

    monkeypatch.setattr(fp8_kernel, "grouped_expert_forward", eager_grouped)
    monkeypatch.setattr(offload, "combine", eager_combine)
    monkeypatch.setattr(offload, "combine_usable", lambda device: True)
    prompt = [1, 306, 4658, 278, 6593, 310, 2834, 338] * 3
    resident = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16"))
    resident.decoder.decode_steps = DecodeSteps(resident.decoder, use_graphs=False)
    expected, expected_ids = _decode(resident, prompt, 16)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16", expert_cache_slots=3,
                                                     host_format="fp8"))
    for slots in model.experts.layers:
        slots.use_grouped = True
    model.decoder.decode_steps = DecodeSteps(model.decoder, use_graphs=False)
    ours, ids = _decode(model, prompt, 16)
    assert ids == expected_ids and torch.equal(ours, expected)
    num_layers = model.config.num_hidden_layers
    assert 0 < len(fused) < 16 * num_layers  # all-hit steps fused; steps with CPU misses not
    assert model.experts.counters()["cpu_experts"] > 0
    model.close()


@pytest.mark.parametrize("static", [False, True], ids=["ordinary", "static"])
def test_benchmark_routing_is_forced_on_both_decode_paths(tiny_checkpoint, static):
    """The GPU benchmark decodes through the static step (decode_step), the CPU one through
    forward: the trace's experts must be the ones used on either path."""
    from engine.bench.measure import TraceRouting
    from engine.experts.traces import random_trace

    trace = random_trace(20, 2, 8, 2, seed=3)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    if static:
        model.decoder.decode_steps = DecodeSteps(model.decoder, use_graphs=False)
    model.decoder.experts = TraceRouting(model.experts, trace, prediction_error=0.0)
    cache = model.decoder.new_cache()
    model.forward(model.embed_ids([1, 306, 4658]), cache)  # a prompt routes as the model does
    model.experts.routing_log = []
    for t in range(8):
        model.forward(model.embed_ids([306 + t]), cache)
    used = [sorted(ids.flatten().tolist()) for ids in model.experts.routing_log]
    assert used == [sorted(trace[t, layer].tolist()) for t in range(8) for layer in range(2)]
    model.close()


def test_a_closed_model_is_freed_without_waiting_for_a_garbage_collection(tiny_checkpoint):
    """GPU loads give the decoder DecodeSteps, which refers back to it: close() breaks that
    cycle, so the weights, slots and (pinned) host store go when the model is dropped, before a
    reload plans against the memory they held."""
    import gc
    import weakref

    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=1))
    model.decoder.decode_steps = DecodeSteps(model.decoder, use_graphs=False)  # as on a GPU
    decoder, store = weakref.ref(model.decoder), weakref.ref(model.experts.store)
    gc.disable()
    try:
        model.close()
        del model
        assert decoder() is None and store() is None
    finally:
        gc.enable()

"""Decode steps as CUDA graphs: the ~80 small kernels of a layer's dense part (norms, MLA
attention over the latent cache, the router, the shared expert) launched as one graph.

Why: at batch 1 a layer's dense part is ~80 kernels of a few microseconds each; launched one
by one from Python they cost ~0.5 ms of host time per layer, ~18 ms per token over 36 layers,
more than the GPU work itself. The routed experts stay outside the graph: which experts run,
and where (slot, PCIe copy, CPU), is decided on the host once the routing is read.

A graph replays fixed kernels on fixed addresses, so the step is written in a static form:
the token's position is a device tensor, the new cache entry is written at that position
into the layer's full-capacity buffer, and attention runs over the whole capacity with the
later keys masked (their probabilities are exactly 0). The static form also runs eagerly
(the CPU tests check it against the ordinary path). On CUDA each layer's step is captured on
first use for the cache's current buffers, and its first replay is checked against the eager
run it was captured from; a failed capture or a mismatch turns graphs off for the model, with
a log line, and the ordinary path serves.
Glossary: H hidden, K experts per token, cap the cache's capacity.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.kv.cache import LatentKVCache
from engine.model.attention import absorbed_block, absorbed_weights, project
from engine.model.layers import gated_mlp, rms_norm
from engine.model.moe import route

log = logging.getLogger(__name__)
# Attending the whole capacity costs nothing next to the rest of a step up to this many keys.
STATIC_MIN_CAPACITY = 32768  # ~10 MB of latents per layer: ~0.1 ms per token on an H100
GRAPH_SETS = 4  # cache buffer sets whose captured steps are kept (a few MB each)


@dataclass
class StepOutputs:
    h: torch.Tensor  # [1, H] residual stream after attention
    x: torch.Tensor  # [1, H] the MoE input (post-attention norm)
    top_weights: torch.Tensor  # [1, K]
    top_idx: torch.Tensor  # [1, K]
    shared: torch.Tensor  # [1, H] the shared expert's output
    predicted: torch.Tensor | None  # [1, K] the next layer's router on h (prefetch), or None


def static_step(decoder, i: int, h: torch.Tensor, pos: torch.Tensor, cache: LatentKVCache,
                predict: bool) -> StepOutputs:
    """Layer i's dense part for one token at position `pos` ([1] int64 on the layer's device),
    with no host synchronisation and no shape that depends on the position."""
    cfg, layer = decoder.cfg, decoder.layers[i]
    rope = decoder.ropes[layer.device]
    cos, sin = rope.cos_sin(pos, h.dtype)
    q_scale = rope.query_scale(pos, h.dtype)[:, None, None]
    x = rms_norm(h, layer.input_layernorm, cfg.rms_norm_eps)
    q_nope, q_pe, kv_latent, k_pe = project(cfg, layer.attn, x, cos, sin)
    latent, k_rope = cache.buffers(i)
    latent.index_copy_(0, pos, kv_latent)
    k_rope.index_copy_(0, pos, k_pe)
    w_uk, w_uv = absorbed_weights(cfg, layer.attn)
    q_latent = torch.einsum("tnd,ndc->tnc", q_nope * q_scale, w_uk)
    mask = torch.arange(latent.shape[0], device=pos.device)[None, :] <= pos[:, None]  # [1, cap]
    out = absorbed_block(cfg, q_latent, q_pe * q_scale, latent, k_rope, mask, w_uv)
    h = h + torch.nn.functional.linear(out.reshape(1, -1), layer.attn.o_proj)
    x = rms_norm(h, layer.post_attention_layernorm, cfg.rms_norm_eps)
    top_weights, top_idx = route(cfg, x, layer.moe.gate)
    shared = gated_mlp(x, layer.moe.shared_gate, layer.moe.shared_up, layer.moe.shared_down)
    predicted = predict_next_experts(cfg, decoder.layers[i + 1], h) if predict else None
    return StepOutputs(h, x, top_weights, top_idx, shared, predicted)


def predict_next_experts(cfg, nxt, h: torch.Tensor) -> torch.Tensor:
    """The next layer's router applied to this layer's residual stream (which changes little
    from one layer to the next): the experts prefetch may start copying. -> [T, K]"""
    return route(cfg, rms_norm(h, nxt.post_attention_layernorm, cfg.rms_norm_eps), nxt.moe.gate)[1]


class _Captured:
    """One layer's captured step: its static input and the outputs each replay rewrites."""

    def __init__(self, graph: torch.cuda.CUDAGraph, h_in: torch.Tensor, out: StepOutputs) -> None:
        self.graph, self.h_in, self.out = graph, h_in, out


class DecodeSteps:
    """Runs decode steps in the static form: captured as CUDA graphs (`use_graphs`, CUDA
    layers only) or eagerly."""

    def __init__(self, decoder, use_graphs: bool) -> None:
        self.decoder, self.use_graphs = decoder, use_graphs
        self.failed = False  # a capture failed or disagreed: the caller falls back for good
        self._pos = {dev: torch.zeros(1, dtype=torch.long, device=dev)
                     for dev in set(decoder.layer_devices)}
        # Captured steps per cache buffer set, the most recent last: switching between a few
        # conversations reuses their graphs instead of capturing 36 layers again.
        self._sets: OrderedDict[tuple, tuple[dict[int, _Captured], dict]] = OrderedDict()
        self._captured: dict[int, _Captured] = {}
        self._pools: dict[torch.device, object] = {}
        # One capture stream per device for good: a fresh stream per capture would leave a
        # cuBLAS workspace behind on each, and PyTorch's default capture stream belongs to
        # whichever GPU was current when it was first made.
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._key: tuple | None = None
        self._cache: LatentKVCache | None = None

    def begin(self, cache: LatentKVCache) -> bool:
        """Before a token: room for it, graphs for these buffers, the position on each device.
        False when the static form would waste work: a capacity far beyond the tokens (a long
        session trimmed to a short prefix) is attended in full; the ordinary path serves."""
        cache.reserve(cache.offset + 1)
        if cache.capacity > max(STATIC_MIN_CAPACITY, 2 * (cache.offset + 1)):
            return False
        key = cache.buffer_ids()  # addresses and capacities: what a captured step writes to
        if key != self._key:  # another cache, or this one grew
            if key not in self._sets:
                self._sets[key] = ({}, {})
                while len(self._sets) > GRAPH_SETS:
                    self._sets.popitem(last=False)  # its graphs and pool are freed with it
            self._sets.move_to_end(key)
            self._captured, self._pools = self._sets[key]
            self._key = key
        self._cache = cache
        for pos in self._pos.values():
            pos.fill_(cache.offset)  # a kernel with the value as its argument: no copy, no wait
        return True

    def end(self) -> None:
        """After a token: the cache is not kept alive by us (the graphs only know addresses)."""
        self._cache = None

    def run(self, i: int, h: torch.Tensor, predict: bool) -> StepOutputs:
        assert self._cache is not None, "begin() first"
        device = self.decoder.layers[i].device
        if not self.use_graphs or device.type != "cuda":
            return static_step(self.decoder, i, h, self._pos[device], self._cache, predict)
        captured = self._captured.get(i)
        if captured is None:
            return self._capture(i, h, predict)
        captured.h_in.copy_(h)
        captured.graph.replay()
        return captured.out

    def _capture(self, i: int, h: torch.Tensor, predict: bool) -> StepOutputs:
        """Warm up on a side stream (lazy initialisations must not be captured), capture, replay
        once and compare with the eager result; any failure turns graphs off."""
        device, pos, cache = h.device, self._pos[h.device], self._cache
        h_in = h.clone()
        previous = torch.cuda.current_stream(device)
        try:
            with torch.cuda.device(device):
                if device not in self._streams:
                    self._streams[device] = torch.cuda.Stream(device)
                stream = self._streams[device]
                stream.wait_stream(previous)
                with torch.cuda.stream(stream):
                    eager = static_step(self.decoder, i, h_in, pos, cache, predict)
                previous.wait_stream(stream)
                pool = self._pools.setdefault(device, torch.cuda.graph_pool_handle())
                graph = torch.cuda.CUDAGraph()
                # The bare capture calls, not torch.cuda.graph(): that one synchronises and
                # empties the memory caches (device and page-locked) on every capture, 36 times
                # for each new cache. thread_local: other threads never touch this capture.
                with torch.cuda.stream(stream):
                    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                    try:
                        out = static_step(self.decoder, i, h_in, pos, cache, predict)
                    finally:
                        graph.capture_end()
                _poison(out)  # the check must see what the replay wrote, not the capture pass
                graph.replay()
                if not _same(eager, out):
                    raise RuntimeError("the captured step disagrees with its eager run")
        except Exception as exc:  # capture is an optimisation: never a reason to fail a decode
            log.warning("CUDA graphs off for decode (layer %d: %s)", i, exc)
            with torch.cuda.device(device):
                torch.cuda.set_stream(previous)  # a failed capture can leave its stream current
            self.failed, self.use_graphs = True, False
            self._sets.clear()
            self._captured, self._pools = {}, {}
            return static_step(self.decoder, i, h, pos, cache, predict)
        self._captured[i] = _Captured(graph, h_in, out)
        return out


def _poison(out: StepOutputs) -> None:
    for t in (out.h, out.x, out.top_weights, out.shared):
        t.fill_(float("nan"))
    out.top_idx.fill_(-1)
    if out.predicted is not None:
        out.predicted.fill_(-1)


def _same(a: StepOutputs, b: StepOutputs) -> bool:
    """The replay ran the eager run's kernels on the same inputs: equal up to rounding noise."""
    if not torch.equal(a.top_idx, b.top_idx):
        return False
    if (a.predicted is None) != (b.predicted is None) or (
            a.predicted is not None and not torch.equal(a.predicted, b.predicted)):
        return False
    pairs = [(a.h, b.h), (a.x, b.x), (a.top_weights, b.top_weights), (a.shared, b.shared)]
    return all(torch.allclose(p.float(), q.float(), rtol=1e-2, atol=1e-3) for p, q in pairs)

"""The offloaded expert backend: a fixed number of expert slots per layer on the layer's device
(engine.experts.slots), a replacement policy, and misses served either by a copy into a slot
(PCIe on a GPU) or by computing the expert on the CPU straight from the host store, split so
both finish together; prefill chunks stream each layer's experts (engine.experts.streaming).

On a CPU-only machine the same code runs with device == host, so CI exercises every path.
Glossary: T tokens, H hidden, I expert width, K experts per token, S slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.checkpoint import Checkpoint
from engine.experts.ceiling import split_misses, split_streamed
from engine.experts.combine_kernel import combine, combine_usable
from engine.experts.compute import cpu_expert_forward, cpu_kernel_for, dequant_expert
from engine.experts.cpu_rate import CpuRateTracker, predicted_seconds
from engine.experts.policy import CachePolicy, LRFUPolicy, LRUPolicy, ShiftLRFUPolicy
from engine.experts.prefetch import SlotPrefetcher
from engine.experts.profile import MachineProfile
from engine.experts.slots import LayerSlots
from engine.experts.storage import to_device
from engine.experts.store import HostExpertStore
from engine.experts.streaming import (
    LOOKAHEAD_MIN_TOKENS,
    ExpertStreamer,
    StagingBuffers,
    experts_ahead,
    issue_ahead,
)
from engine.model.moe import Deferred, ExpertBackend, run_experts

log = logging.getLogger(__name__)
# At or above this many tokens in a forward (prefill chunks) a layer's experts are streamed
# through staging once per chunk instead of going through the decode cache.
STREAM_MIN_TOKENS = 64
POLICIES = {"lru": LRUPolicy, "lrfu": LRFUPolicy, "shift": ShiftLRFUPolicy}


class OffloadedExperts(ExpertBackend):
    """Expert backend with `slots_per_layer` cached experts per layer (one count for every
    layer, or one per layer as the plan spreads them); the rest on the host."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, layer_devices: list[torch.device],
                 slots_per_layer: int | Sequence[int], *, host_mode: str = "pinned", host_format: str = "fp8",
                 policy: str = "shift", cpu_misses: bool = True, prefetch: bool = False,
                 progress=None) -> None:
        cfg = ckpt.config
        self.dtype = dtype
        self.num_experts = cfg.n_routed_experts
        if host_mode == "pinned" and all(d.type != "cuda" for d in layer_devices):
            host_mode = "ram"  # page-locking ~110 GB helps only copies to a GPU
        gpus = [d for d in layer_devices if d.type == "cuda"]
        self.store = HostExpertStore(ckpt, host_mode, host_format, progress, gpus[0] if gpus else None)
        if isinstance(slots_per_layer, int):
            slots_per_layer = [slots_per_layer] * cfg.num_hidden_layers
        sizes = [max(0, min(n, self.num_experts)) for n in slots_per_layer]
        self.policy: CachePolicy = POLICIES[policy](slots_per_layer=sizes)
        firsts = [sum(sizes[:i]) for i in range(len(sizes))]  # the policy's slot ids are global
        self.layers = [LayerSlots(self.store.layers[i], dev, sizes[i], firsts[i])
                       for i, dev in enumerate(layer_devices)]
        self.cpu_misses = cpu_misses
        if cpu_misses:  # build (once per machine) and self-test now, not in the first answer
            cpu_kernel_for(self.store.fmt)
        self._cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="quire-cpu-experts")
        self.routing_log: list[torch.Tensor] | None = None
        # Set on GPU loads (engine.experts.profile), one per GPU: each card has its own PCIe
        # link (a second card often sits in an x8 slot). With a layer's device's profile, a
        # step's misses (and a short prefill chunk's streamed experts) are split so that PCIe
        # copies and CPU compute finish together; without it, admission alone decides.
        self.profiles: dict[torch.device, MachineProfile] = {}
        self.cpu_rate = CpuRateTracker()  # what the CPU jobs achieve, beside the profile
        self._buffers: dict[torch.device, StagingBuffers] = {}
        self.bytes_copied = 0
        self.bytes_cpu = 0
        self.num_cpu_experts = 0
        self.num_ahead_issued = self.num_ahead_used = 0  # prefill groups copied ahead, adopted
        # Host seconds blocked: on each layer's routing (the GPU finishing the work before it,
        # copies included) and on CPU-computed experts (the CPU path finishing after the GPU's).
        self.wait_routing_s = self.wait_cpu_s = 0.0
        # Prefetch (engine.experts.prefetch): the decoder tells us layer i+1's predicted experts
        # before layer i runs (`expect`), and layer i queues their copies behind its own.
        if prefetch and self.store.mode != "pinned" and any(d.type == "cuda" for d in layer_devices):
            # Copies from pageable memory (mapped files, or RAM left unlocked) block the host
            # until they are done: a prefetch would stall the layer it is meant to overlap.
            log.warning("prefetch is off: the experts are not in page-locked memory")
            prefetch = False
        self.prefetcher = SlotPrefetcher() if prefetch else None
        self._expected: tuple[int, torch.Tensor] | None = None

    @property
    def prefetch_enabled(self) -> bool:
        return self.prefetcher is not None

    def expect(self, layer: int, predicted_idx: torch.Tensor) -> None:
        """The experts `layer` is predicted to choose for the next decode token. Read only after
        the current layer's routing wait (by then it is computed): reading it now would add a
        second wait on the GPU per layer."""
        self._expected = (layer, predicted_idx)

    # ------------------------------------------------------------------ expert backend
    def forward(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                top_weights: torch.Tensor) -> torch.Tensor:
        top_idx = self._routing_on_host(layer, top_idx)
        if x.shape[0] >= STREAM_MIN_TOKENS:
            return self._streamed(layer, x, top_idx, top_weights)
        plan, _ = self._serve(layer, x, top_idx)
        return run_experts(x, top_idx, top_weights, plan.__getitem__)

    def decode_step(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                    top_weights: torch.Tensor, h: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """One decode token's routed experts, then the layer's end: h + (routed + shared).

        When the grouped kernel served every selected expert, one more launch finishes the
        layer (engine.experts.combine_kernel), bit-identical to the eager sum and ~12 launches
        fewer; a step with CPU-computed misses sums as forward does.
        """
        top_idx = self._routing_on_host(layer, top_idx)
        plan, grouped = self._serve(layer, x, top_idx)
        if grouped is not None and len(grouped[0]) == len(plan) and combine_usable(x.device):
            return combine(grouped[1], top_weights, grouped[2], shared, h)
        return h + (run_experts(x, top_idx, top_weights, plan.__getitem__) + shared)

    def begin_layer(self, layer: int, num_tokens: int) -> None:
        """A chunk of num_tokens is about to enter `layer`. A long one will stream nearly all of
        the layer's experts, so the first two staging groups are copied now, while its attention
        runs, instead of after its routing (engine.experts.streaming.issue_ahead)."""
        slots = self.layers[layer]
        # From page-locked memory only: a copy from pageable memory (mapped files) blocks the
        # host until the side stream, told to wait for all queued compute, has run it.
        if num_tokens < LOOKAHEAD_MIN_TOKENS or self.store.mode != "pinned":
            return
        buffers = self._staging(slots)
        if buffers is None:
            return
        ahead = experts_ahead(self.num_experts, lambda e: self.policy.peek((layer, e)) is not None)
        self.bytes_copied += issue_ahead(buffers, slots.host, layer, ahead)
        self.num_ahead_issued += 1

    def _routing_on_host(self, layer: int, top_idx: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        top_idx = top_idx.cpu()  # the one wait on the GPU this layer: routing is host work
        self.wait_routing_s += time.perf_counter() - t0
        if self._expected is not None and self._expected[0] == layer + 1:
            # Computed before this layer's routing: ready now, so this copy does not wait;
            # read later, it would wait for the demand copies queued meanwhile.
            self._expected = (layer + 1, self._expected[1].cpu())
        if self.routing_log is not None:
            self.routing_log.append(top_idx)
        return top_idx

    def _serve(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor):
        """Where each selected expert runs this step: ({expert: weights, callable or Deferred},
        and (experts, outputs [n, 1, H], their router columns on the device) when the grouped
        kernel ran, else None). Hits run from their slots; misses are copied into a slot or
        computed on the CPU, split so both finish together."""
        slots = self.layers[layer]
        plan: dict[int, object] = {}
        misses = []
        selected = sorted(set(top_idx.flatten().tolist()))
        if self.prefetcher is not None:
            self.prefetcher.account(layer, set(selected))
        # One decode token on a GPU: every slot expert goes through the grouped kernel at the
        # end, so no per-expert weights are looked up on the way.
        grouping = slots.use_grouped and x.shape[0] == 1 and self.dtype == torch.bfloat16
        in_slot: dict[int, int] = {}  # experts computed from their slots: expert -> slot
        for expert in selected:
            slot = self.policy.lookup((layer, expert))
            if slot is None:
                misses.append(expert)
            else:
                self._before_slot_use(layer, slot)
                if not grouping:
                    plan[expert] = slots.weights(slot, expert, self.dtype)
                in_slot[expert] = slot
        decisions = self._copy_decisions(layer, misses, selected)
        # CPU work starts first: its input must reach the host before the PCIe copies are
        # queued, or the transfer would wait for those copies and the two paths would not overlap.
        on_cpu = self._cpu_experts(layer, [e for e, a in decisions if a is None] if self.cpu_misses
                                   else [], x, top_idx)
        for expert, admitted in decisions:
            if admitted is None:
                if not self.cpu_misses:  # no CPU path: serve from a staging copy, uncached
                    plan[expert] = self._staged(layer, expert, slots.device)
                continue
            evicted = admitted[1]
            if evicted is not None and evicted[0] == layer and evicted[1] in in_slot:
                # A hit of this very step is being evicted: keep its weights first.
                plan[evicted[1]] = slots.materialize(admitted[0], evicted[1], self.dtype)
                del in_slot[evicted[1]]
            self._before_slot_use(layer, admitted[0])  # a queued prefetch into it comes first
            self.bytes_copied += slots.fill(admitted[0], expert)
            if not grouping:
                plan[expert] = slots.weights(admitted[0], expert, self.dtype)
            in_slot[expert] = admitted[0]
        grouped = None
        if in_slot and grouping:
            grouped = slots.grouped(x, in_slot, top_idx[0].tolist())
            for expert, y in zip(grouped[0], grouped[1], strict=True):
                plan[expert] = _computed(y)
        plan.update(on_cpu)
        if self.prefetcher is not None:
            self._prefetch_next(layer, slots.device)
        return plan, grouped

    def _before_slot_use(self, layer: int, slot: int) -> None:
        if self.prefetcher is not None:
            self.prefetcher.before_use(layer, slot, self.layers[layer].device)

    def _prefetch_next(self, layer: int, device: torch.device) -> None:
        """Queue copies of layer+1's predicted experts that are not cached, behind this layer's
        demand copies; the policy decides which residents (if any) make room."""
        expected, self._expected = self._expected, None
        if expected is None or expected[0] != layer + 1 or layer + 1 >= len(self.layers):
            return
        target, experts = expected[0], sorted(set(expected[1].flatten().tolist()))
        predicted = {(target, e) for e in experts}
        fills = []
        for expert in experts:
            admitted = self.policy.admit_prefetch((target, expert), keep=predicted)
            if admitted is not None:
                fills.append((admitted[0], expert))
        after = None
        if device.type == "cuda" and fills:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(device))
        self.prefetcher.issue(self.layers[target], target, fills, after)

    def _copy_decisions(self, layer: int, misses: list[int], selected: list[int]
                        ) -> list[tuple[int, tuple[int, tuple[int, int] | None] | None]]:
        """(expert, its slot and evicted key, or None for the CPU) for each miss, in id order.

        With measured rates the split is kept: the misses the policy ranks highest take the
        PCIe share and are cached, admitted past the bypass test if need be. Bypassed misses
        falling to the CPU would load it far beyond its share (simulated on the calibrated
        trace at the 24 GiB plan: 25.1 ms of miss time per token against 19.1 balanced, the
        hit rate unchanged; random routing 48.2 against 32.7).
        """
        num_copies = self._num_copies(layer, len(misses), self.layers[layer].host.expert_bytes())
        balanced = self.cpu_misses and self._profile(layer) is not None
        if not balanced:  # admission alone decides what is copied
            return [(e, self.policy.admit((layer, e)) if i < num_copies else None)
                    for i, e in enumerate(misses)]
        ranked = sorted(misses, key=lambda e: self.policy.preference((layer, e)), reverse=True)
        copied = set(ranked[:num_copies])
        keep = {(layer, e) for e in selected}
        return [(e, self.policy.admit((layer, e), force=True, keep=keep) if e in copied else None)
                for e in misses]

    def _profile(self, layer: int) -> MachineProfile | None:
        """The measured rates of the layer's GPU (None on CPU loads), the CPU's as its
        jobs achieve them (engine.experts.cpu_rate)."""
        p = self.profiles.get(self.layers[layer].device)
        return None if p is None else self.cpu_rate.adjusted(p)

    def _num_copies(self, layer: int, num_misses: int, expert_bytes: int) -> int:
        """How many of a step's misses go over PCIe (the rest to the CPU), so both finish together."""
        p = self._profile(layer)
        if not self.cpu_misses or p is None:
            return num_misses
        return split_misses(num_misses, expert_bytes, p.pcie_bytes_per_s, p.cpu_expert_bytes_per_s)[0]

    def _cpu_experts(self, layer: int, experts: list[int], x: torch.Tensor, top_idx: torch.Tensor
                     ) -> dict[int, object]:
        """run_experts sources for `experts` computed on the CPU from the host store. Beside a
        GPU (or with measured rates) all of them run as one job on the CPU thread, so the GPU's
        work proceeds meanwhile and the step pays one hand-off (~20-70 us), not one per expert;
        on a CPU layer there is nothing to overlap, so they run inline when their turn comes."""
        if not experts:
            return {}
        host = self.store.layers[layer]
        self.bytes_cpu += len(experts) * host.expert_bytes()
        self.num_cpu_experts += len(experts)

        def forward(expert: int, xs: torch.Tensor) -> torch.Tensor:
            return cpu_expert_forward(xs, host.gate_up[expert], host.gate_up_scale[expert],
                                      host.down[expert], host.down_scale[expert], self.dtype)

        if self.layers[layer].device.type == "cpu" and self._profile(layer) is None:
            return {e: (lambda xs, e=e: forward(e, xs)) for e in experts}
        x_host = x.to("cpu")
        if x.shape[0] == 1:  # a decode step: every selected expert takes the one token
            inputs = [x_host] * len(experts)  # (4 tensor ops an expert saved, ~0.1 ms a layer)
        else:
            inputs = [x_host[torch.where((top_idx == e).any(dim=-1))[0]] for e in experts]

        quiet = self.profiles.get(self.layers[layer].device)
        predicted_s = 0.0 if quiet is None else \
            predicted_seconds(quiet, host.expert_bytes(), [xs.shape[0] for xs in inputs])

        def run() -> list[torch.Tensor]:
            t0 = time.perf_counter()
            outputs = [forward(e, xs) for e, xs in zip(experts, inputs, strict=True)]
            self.cpu_rate.observe(predicted_s, time.perf_counter() - t0)
            return outputs

        job = self._cpu_pool.submit(run)

        def output(i: int) -> torch.Tensor:
            t0 = time.perf_counter()  # time the caller blocks: the CPU path running late
            try:
                return job.result()[i]
            finally:
                self.wait_cpu_s += time.perf_counter() - t0

        return {e: Deferred(lambda i=i: output(i)) for i, e in enumerate(experts)}

    def _staged(self, layer: int, expert: int, device: torch.device):
        host = self.store.layers[layer]
        self.bytes_copied += host.expert_bytes()
        slots = self.layers[layer]
        return dequant_expert(to_device(host.gate_up[expert], device, non_blocking=True),
                              slots.gate_up_scale[expert],
                              to_device(host.down[expert], device, non_blocking=True),
                              slots.down_scale[expert], self.dtype)

    def _streamed(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                  top_weights: torch.Tensor) -> torch.Tensor:
        """Prefill: every expert the chunk uses, once, from its slot or streamed from the host
        (engine.experts.streaming); the chunk's routing counts warm the cache for decode."""
        slots = self.layers[layer]
        if self.prefetcher is not None:
            self.prefetcher.drain()
        experts, counts = torch.unique(top_idx, return_counts=True)
        ids, num_tokens = experts.tolist(), counts.tolist()
        cached = {e: s for e in ids if (s := self.policy.peek((layer, e))) is not None}
        # The CPU's share starts first, as in decode: its input reaches the host before the
        # copies are queued.
        on_cpu = self._cpu_share(layer, x, top_idx, [(e, t) for e, t in zip(ids, num_tokens)
                                                     if e not in cached])
        streamer = ExpertStreamer(slots, layer, [e for e in ids if e not in on_cpu], cached,
                                  self.dtype, self._staging(slots))
        out = run_experts(x, top_idx, top_weights, lambda e: on_cpu[e] if e in on_cpu else streamer(e))
        self.bytes_copied += streamer.num_bytes_copied
        self.num_ahead_used += streamer.adopted
        self.seed({(layer, e): float(c) for e, c in zip(ids, num_tokens)})
        return out

    def _cpu_share(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                   missing: list[tuple[int, int]]) -> dict[int, object]:
        """CPU sources for the streamed experts (expert, its tokens) the CPU finishes sooner
        than their copies would (engine.experts.ceiling.split_streamed): none for long chunks."""
        p = self._profile(layer)
        if self.cpu_misses and p is None and self.layers[layer].device.type == "cpu":
            # A CPU-only load: nothing to copy to. Each expert straight from the host format
            # (int8's and the C kernels' weight-only matmuls read it once; dequantising a copy
            # first cost 12x the time for int8 and 1.4x for NVFP4 in a 512-token prefill).
            return self._cpu_experts(layer, [e for e, _ in missing], x, top_idx)
        # Below the copy-ahead length only (a chunk's first groups are then fixed before routing):
        # the whole input goes to the host (32 MB at 4K), and GPU outputs after the first CPU
        # expert wait for it.
        if not self.cpu_misses or p is None or not missing or x.shape[0] >= LOOKAHEAD_MIN_TOKENS:
            return {}
        chosen = split_streamed([t for _, t in missing], self.layers[layer].host.expert_bytes(),
                                p.pcie_bytes_per_s, p.cpu_expert_bytes_per_s, p.cpu_expert_tokens_per_s)
        return self._cpu_experts(layer, [missing[i][0] for i in sorted(chosen)], x, top_idx)

    def _staging(self, slots: LayerSlots) -> StagingBuffers | None:
        if slots.device.type != "cuda":
            return None
        if slots.device not in self._buffers:
            self._buffers[slots.device] = StagingBuffers(slots.host.gate_up, slots.host.down, slots.device)
        return self._buffers[slots.device]

    def release_staging(self) -> None:
        """Free the prefill staging buffers (made again by the next long chunk), so the vision
        encoder can borrow the workspace. Work already queued keeps them: the allocator frees
        a block for reuse in stream order."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
        for device, buffers in self._buffers.items():
            # Copies made ahead for a chunk that then failed are still queued on the side
            # stream: the compute stream, in whose order the blocks are freed, waits for them.
            if device.type == "cuda":
                torch.cuda.current_stream(device).wait_stream(buffers.stream)
        self._buffers.clear()

    def seed(self, counts: dict[tuple[int, int], float]) -> None:
        if self.prefetcher is not None:
            self.prefetcher.drain()
        before = self.policy.resident()
        self.policy.seed(counts)
        for key, slot in self.policy.resident().items():
            if before.get(key) != slot:
                self.bytes_copied += self.layers[key[0]].fill(slot, key[1])

    def reset_counters(self) -> None:
        """Start counting afresh (after a benchmark's warm-up); the cache contents stay."""
        self.policy.num_hits = self.policy.num_misses = 0
        self.bytes_copied = self.bytes_cpu = self.num_cpu_experts = 0
        self.num_ahead_issued = self.num_ahead_used = 0
        self.wait_routing_s = self.wait_cpu_s = 0.0
        if self.prefetcher is not None:
            self.prefetcher.reset_counters()

    def counters(self) -> dict[str, float]:
        """Cache and traffic counters; bytes_copied includes prefetched bytes."""
        p = self.policy
        out = {"hits": p.num_hits, "misses": p.num_misses, "hit_rate": p.hit_rate,
               "bytes_copied": self.bytes_copied, "bytes_cpu": self.bytes_cpu,
               "cpu_experts": self.num_cpu_experts, "prefill_ahead_issued": self.num_ahead_issued,
               "prefill_ahead_used": self.num_ahead_used, "wait_routing_s": self.wait_routing_s,
               "wait_cpu_s": self.wait_cpu_s, "cpu_speed_seen": self.cpu_rate.factor or 0.0}
        if self.prefetcher is not None:
            out |= self.prefetcher.counters()
            out["bytes_copied"] += out["bytes_prefetched"]
        return out

    def close(self) -> None:
        self._cpu_pool.shutdown(wait=True)


def _computed(y: torch.Tensor):
    """An expert output computed ahead (grouped kernel), in run_experts' callable form."""
    return lambda xs: y

"""Prefill expert streaming: a chunk uses nearly every expert of a layer, so each expert it
needs is brought to the GPU once per chunk. Cached experts come from their slots; the rest
stream from the host store through two staging buffers of GROUP experts, the copy of the
next group running on a side CUDA stream while the current group computes.

On a CPU-only machine (device == host) the experts are read from the host store directly.
Glossary: G experts per group, I expert width, H hidden.
"""

from __future__ import annotations

import torch

from engine.experts.compute import dequant_expert

# 2 buffers x 4 experts x 25 MB = 200 MB of staging at the real shapes; a group's 100 MB copy
# keeps PCIe busy for ~2 ms, far longer than the work between two groups' copies.
GROUP = 4


class StagingBuffers:
    """Two groups' worth of expert weights on one GPU, plus the side stream that fills them."""

    def __init__(self, like_gate_up: torch.Tensor, like_down: torch.Tensor, device: torch.device) -> None:
        self.gate_up = torch.empty((2, GROUP, *like_gate_up.shape[1:]), dtype=like_gate_up.dtype, device=device)
        self.down = torch.empty((2, GROUP, *like_down.shape[1:]), dtype=like_down.dtype, device=device)
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.free = [torch.cuda.Event(), torch.cuda.Event()]


class ExpertStreamer:
    """`expert_weights` for run_experts over one prefill chunk (called in ascending expert id)."""

    def __init__(self, slots, layer: int, experts: list[int], cached: dict[int, int],
                 dtype: torch.dtype, buffers: StagingBuffers | None) -> None:
        self.slots, self.layer, self.dtype, self.buffers = slots, layer, dtype, buffers
        self.cached = cached
        missing = [e for e in experts if e not in cached]
        self.groups = [missing[i : i + GROUP] for i in range(0, len(missing), GROUP)]
        self.where = {e: (g, i) for g, grp in enumerate(self.groups) for i, e in enumerate(grp)}
        self.num_bytes_copied = 0
        self._current_group = -1
        if buffers is not None:
            # The buffers may still be read by the previous chunk's queued compute.
            buffers.stream.wait_stream(torch.cuda.current_stream(buffers.gate_up.device))
            for g in range(min(2, len(self.groups))):
                self._issue_copy(g)

    def __call__(self, expert: int):
        if expert in self.cached:
            return self.slots.materialize(self.cached[expert], expert, self.dtype)
        host = self.slots.host
        if self.buffers is None:  # CPU: compute straight from the host store
            return dequant_expert(host.gate_up[expert], host.gate_up_scale[expert],
                                  host.down[expert], host.down_scale[expert], self.dtype)
        g, i = self.where[expert]
        if g != self._current_group:
            self._enter_group(g)
        b, slots = self.buffers, self.slots
        return dequant_expert(b.gate_up[g % 2, i], slots.gate_up_scale[expert], b.down[g % 2, i],
                              slots.down_scale[expert], self.dtype)

    def _enter_group(self, g: int) -> None:
        b = self.buffers
        assert b is not None
        compute = torch.cuda.current_stream(b.gate_up.device)
        if self._current_group >= 0:
            # The previous group's weights were dequantised on the compute stream: once that
            # work is done its buffer may be refilled with group + 2.
            prev = self._current_group
            b.free[prev % 2].record(compute)
            if prev + 2 < len(self.groups):
                self._issue_copy(prev + 2)
        compute.wait_event(b.ready[g % 2])
        self._current_group = g

    def _issue_copy(self, g: int) -> None:
        b = self.buffers
        assert b is not None
        host = self.slots.host
        with torch.cuda.stream(b.stream):
            if g >= 2:
                b.stream.wait_event(b.free[g % 2])
            for i, expert in enumerate(self.groups[g]):
                b.gate_up[g % 2, i].copy_(host.gate_up[expert], non_blocking=True)
                b.down[g % 2, i].copy_(host.down[expert], non_blocking=True)
                self.num_bytes_copied += host.expert_bytes()
            b.ready[g % 2].record(b.stream)

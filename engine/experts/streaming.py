"""Prefill expert streaming: a chunk uses nearly every expert of a layer, so each expert it
needs is brought to the GPU once per chunk. Cached experts come from their slots; the rest
stream from the host store through two staging buffers of GROUP experts, the copy of the
next group running on a side CUDA stream while the current group computes. For long chunks
the first two groups of the next layer are copied ahead (`issue_ahead`), while that layer's
attention runs: the link would otherwise idle until its routing is known.

On a CPU-only machine (device == host) the experts are read from the host store directly.
Glossary: G experts per group, I expert width, H hidden.
"""

from __future__ import annotations

import torch

from engine.experts.compute import dequant_expert
from engine.experts.storage import byte_view, empty_like_format

# 2 buffers x 4 experts x 25 MB = 200 MB of staging at the real shapes; a group's 100 MB copy
# keeps PCIe busy for ~2 ms, far longer than the work between two groups' copies.
GROUP = 4
# From this many tokens a chunk uses every expert of a layer (a given expert goes unused with
# odds ~exp(-T K / E), e^-128 at 4K), so the ones to copy ahead are known before routing.
LOOKAHEAD_MIN_TOKENS = 4096


class StagingBuffers:
    """Two groups' worth of expert weights on one GPU, plus the side stream that fills them."""

    def __init__(self, like_gate_up: torch.Tensor, like_down: torch.Tensor, device: torch.device) -> None:
        self.gate_up = empty_like_format((2, GROUP, *like_gate_up.shape[1:]), like_gate_up.dtype, device)
        self.down = empty_like_format((2, GROUP, *like_down.shape[1:]), like_down.dtype, device)
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.free = [torch.cuda.Event(), torch.cuda.Event()]
        # (layer, experts) copied ahead into groups 0 and 1; valid until the next streamer
        # takes it (any later copy could have overwritten the buffers).
        self.ahead: tuple[int, list[int]] | None = None


def experts_ahead(num_experts: int, is_cached) -> list[int]:
    """The experts of a long chunk's first two groups: all experts in id order, less the cached
    ones (is_cached(e) -> bool), as ExpertStreamer groups them."""
    return [e for e in range(num_experts) if not is_cached(e)][: 2 * GROUP]


def issue_ahead(buffers: StagingBuffers, host, layer: int, experts: list[int]) -> int:
    """Copy `experts` into groups 0 and 1 of the staging buffers before `layer` is routed, after
    the compute queued so far (the previous layer's, which reads them); returns the bytes."""
    buffers.stream.wait_stream(torch.cuda.current_stream(buffers.gate_up.device))
    groups = [experts[i : i + GROUP] for i in range(0, min(len(experts), 2 * GROUP), GROUP)]
    for g, group in enumerate(groups):
        _copy_group(buffers, host, group, g)
    buffers.ahead = (layer, [e for group in groups for e in group])
    return sum(len(group) for group in groups) * host.expert_bytes()


def adopted_groups(ahead: tuple[int, list[int]] | None, layer: int,
                   missing: list[int]) -> list[list[int]] | None:
    """The staging groups for `missing` (the chunk's uncached experts, ascending) that keep the
    copies made ahead where they lie: the ahead groups as copied, then the rest. None when the
    copies are another layer's or miss a used expert among them (the groups would not be
    visited in ascending order). An expert copied ahead that the chunk does not use only costs
    its copy: before, one such expert made the whole guess be copied again."""
    if ahead is None or ahead[0] != layer or not ahead[1] or ahead[1] != sorted(ahead[1]):
        return None
    copied, last = set(ahead[1]), ahead[1][-1]
    if any(e not in copied for e in missing if e <= last):
        return None
    rest = [e for e in missing if e > last]
    return [ahead[1][i : i + GROUP] for i in range(0, len(ahead[1]), GROUP)] + \
        [rest[i : i + GROUP] for i in range(0, len(rest), GROUP)]


def _copy_group(b: StagingBuffers, host, experts: list[int], g: int) -> None:
    """Queue group g's copies into buffer g % 2 on the side stream; ready[g % 2] marks them."""
    with torch.cuda.stream(b.stream):
        if g >= 2:
            b.stream.wait_event(b.free[g % 2])
        for i, expert in enumerate(experts):
            byte_view(b.gate_up[g % 2, i]).copy_(byte_view(host.gate_up[expert]), non_blocking=True)
            byte_view(b.down[g % 2, i]).copy_(byte_view(host.down[expert]), non_blocking=True)
        b.ready[g % 2].record(b.stream)


class ExpertStreamer:
    """`expert_weights` for run_experts over one prefill chunk (called in ascending expert id)."""

    def __init__(self, slots, layer: int, experts: list[int], cached: dict[int, int],
                 dtype: torch.dtype, buffers: StagingBuffers | None) -> None:
        self.slots, self.layer, self.dtype, self.buffers = slots, layer, dtype, buffers
        self.cached = cached
        missing = [e for e in experts if e not in cached]
        ahead = None
        if buffers is not None:
            ahead, buffers.ahead = buffers.ahead, None
        groups = adopted_groups(ahead, layer, missing)
        self.adopted = groups is not None  # groups 0 and 1 were copied ahead (offload.begin_layer)
        copied_ahead = -(-len(ahead[1]) // GROUP) if groups is not None else 0
        if groups is None:
            groups = [missing[i : i + GROUP] for i in range(0, len(missing), GROUP)]
        self.groups = groups
        self.where = {e: (g, i) for g, grp in enumerate(self.groups) for i, e in enumerate(grp)}
        self.num_bytes_copied = 0
        self._current_group = -1
        if buffers is not None and copied_ahead < min(2, len(self.groups)):
            # The buffers may still be read by the previous chunk's queued compute (and
            # copies made ahead for nothing are queued before these, on the same stream).
            buffers.stream.wait_stream(torch.cuda.current_stream(buffers.gate_up.device))
            for g in range(copied_ahead, min(2, len(self.groups))):
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
        # One group at a time, also through groups none of whose experts the chunk uses (copied
        # ahead, unused): each group left is what issues the copy into its buffer two groups on.
        while self._current_group < g:
            self._next_group()

    def _next_group(self) -> None:
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
        self._current_group += 1
        compute.wait_event(b.ready[self._current_group % 2])

    def _issue_copy(self, g: int) -> None:
        assert self.buffers is not None
        _copy_group(self.buffers, self.slots.host, self.groups[g], g)
        self.num_bytes_copied += len(self.groups[g]) * self.slots.host.expert_bytes()

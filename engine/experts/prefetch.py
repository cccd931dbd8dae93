"""Next-layer expert prefetch: while layer i computes, copy the experts layer i+1 is predicted
to choose (its router applied to layer i's hidden state) into their GPU slots.

The copies run on a side CUDA stream queued behind the layer's demand copies, so they never
delay a miss that is needed now, and each slot they fill carries an event that a later use
(or refill) of the slot waits on. A queued CUDA copy cannot be cancelled: a prediction the
routing then disagrees with only costs the bytes, and the mispredicted expert stays in the
cache ranked like an expert used once when it was predicted (the policy's admit_prefetch),
aging out like any other. Whether prefetch pays
is the benchmark's call (`python -m engine.bench --prefetch`): the prior-art note measured
0-14%, since prefetched bytes share the same PCIe link as demand misses.

On a CPU-only machine the copies are plain synchronous memcpys, so CI exercises every path.
"""

from __future__ import annotations

import torch


class SlotPrefetcher:
    """Side-stream copies into expert slots, and the events that order later slot accesses."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # (layer, slot) -> (the copy's done event, the slot's device)
        self._pending: dict[tuple[int, int], tuple[torch.cuda.Event, torch.device]] = {}
        self.num_issued = 0
        self.num_used = 0
        self.num_wasted = 0
        self._unused: dict[int, set[int]] = {}  # layer -> experts prefetched, not yet used
        self.bytes_copied = 0

    def issue(self, slots, layer: int, fills: list[tuple[int, int]], after: torch.cuda.Event | None
              ) -> None:
        """`after` is None only on the CPU (no streams)."""
        """Copy `fills` [(slot, expert)] of `slots` (a LayerSlots) behind the event `after`
        (the demand copies of the layer computing now)."""
        if not fills:
            return
        self.num_issued += len(fills)
        self._unused.setdefault(layer, set()).update(e for _, e in fills)
        if slots.device.type != "cuda":
            for slot, expert in fills:
                self.bytes_copied += slots.fill(slot, expert)
            return
        stream = self._stream(slots.device)
        # `after` was recorded on this device's compute stream once the current layer's demand
        # copies were queued, so it also follows every earlier read of the target layer's slots
        # (the previous token's compute): refilling an evicted slot cannot race with it.
        stream.wait_event(after)
        with torch.cuda.stream(stream):
            for slot, expert in fills:
                self.bytes_copied += slots.fill(slot, expert)
                done = torch.cuda.Event()
                done.record(stream)
                self._pending[(layer, slot)] = (done, slots.device)

    def before_use(self, layer: int, slot: int, device: torch.device) -> None:
        """Make the compute stream wait for a prefetch copy into this slot, if one is queued."""
        pending = self._pending.pop((layer, slot), None)
        if pending is not None:
            torch.cuda.current_stream(device).wait_event(pending[0])

    def drain(self) -> None:
        """Make every device's compute stream wait for all queued prefetches (before work that
        fills or reads slots wholesale: a prefill chunk, seeding the cache)."""
        for done, device in self._pending.values():
            torch.cuda.current_stream(device).wait_event(done)
        self._pending.clear()

    def account(self, layer: int, used: set[int]) -> None:
        """After layer's routing is known: prefetched experts it used, and the ones it did not."""
        unused = self._unused.pop(layer, set())
        hit = unused & used
        self.num_used += len(hit)
        self.num_wasted += len(unused - hit)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def counters(self) -> dict[str, int]:
        return {"prefetch_issued": self.num_issued, "prefetch_used": self.num_used,
                "prefetch_wasted": self.num_wasted, "bytes_prefetched": self.bytes_copied}

    def reset_counters(self) -> None:
        self.num_issued = self.num_used = self.num_wasted = self.bytes_copied = 0

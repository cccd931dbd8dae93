"""GPU expert-cache replacement policies over (layer, expert) keys, and the Belady bound.

A policy owns slot bookkeeping only (no tensors): `lookup` says where a key lives (and counts
a hit or a miss), `admit` gives a missed key a slot, possibly evicting another, or returns
None to bypass (the miss is served by a copy into staging or by the CPU and not cached).
Slots are either one global pool or fixed per-layer budgets; slot ids are global ints.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

Key = tuple[int, int]  # (layer, expert)
Counts = Mapping[Key, float] | np.ndarray  # np: [L, E] uses per layer and expert


def _counts_items(counts: Counts) -> list[tuple[Key, float]]:
    if isinstance(counts, np.ndarray):
        layers, experts = np.nonzero(counts)
        return [((int(layer), int(e)), float(counts[layer, e]))
                for layer, e in zip(layers, experts)]
    return [(key, float(c)) for key, c in counts.items() if c > 0]


class CachePolicy:
    """Slot bookkeeping shared by every policy; subclasses choose victims and admissions."""

    def __init__(self, capacity: int | None = None,
                 slots_per_layer: Sequence[int] | None = None) -> None:
        if (capacity is None) == (slots_per_layer is None):
            raise ValueError("give either capacity (a global pool) or slots_per_layer")
        sizes = [capacity] if capacity is not None else list(slots_per_layer or [])
        if any(s < 0 for s in sizes):
            raise ValueError("slot counts cannot be negative")
        self.is_per_layer = slots_per_layer is not None
        starts = np.cumsum([0] + sizes)
        # Free slots per partition, popped from the end so the lowest ids go first.
        self._free = [list(range(int(starts[i + 1]) - 1, int(starts[i]) - 1, -1))
                      for i in range(len(sizes))]
        self._sizes = sizes
        self._slot: dict[Key, int] = {}
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0
        self.num_bypasses = 0

    @property
    def capacity(self) -> int:
        return sum(self._sizes)

    @property
    def hit_rate(self) -> float:
        total = self.num_hits + self.num_misses
        return self.num_hits / total if total else 0.0

    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def peek(self, key: Key) -> int | None:
        """The slot holding key, or None, without counting or touching recency."""
        return self._slot.get(key)

    def resident(self) -> dict[Key, int]:
        """A copy of the resident keys and their slots."""
        return dict(self._slot)

    def _part(self, key: Key) -> int:
        return key[0] if self.is_per_layer else 0

    def lookup(self, key: Key) -> int | None:
        """The slot holding key, or None; counts a hit or a miss."""
        slot = self._slot.get(key)
        if slot is None:
            self.num_misses += 1
            self._on_miss(key)
        else:
            self.num_hits += 1
            self._on_hit(key)
        return slot

    def admit(self, key: Key, force: bool = False, keep: frozenset[Key] | set[Key] = frozenset()
              ) -> tuple[int, Key | None] | None:
        """Give key a slot: (slot, evicted key or None), or None to bypass (do not cache).

        force: the key is being copied to the GPU anyway (its share of the step's misses goes
        over PCIe), so it takes the slot of the lowest-ranked resident outside `keep` (the
        step's own experts) even where the policy would bypass it. None then only when the
        layer has no such resident.
        """
        if key in self._slot:
            return self._slot[key], None

        def victim(part: int) -> Key | None:  # never one of the step's own experts
            found = self._victim(key, part)
            return None if found in keep else found

        placed = self._place(key, victim)
        if placed is None and force:
            placed = self._place(key, lambda part: self._lowest(part, keep))
        if placed is None:
            self.num_bypasses += 1
        return placed

    def preference(self, key: Key) -> float:
        """How much the policy wants key cached (higher first), e.g. to choose which of a step's
        misses take the PCIe copies. Equal for every key unless a subclass ranks them."""
        return 0.0

    def admit_prefetch(self, key: Key, keep: frozenset[Key] | set[Key] = frozenset()
                       ) -> tuple[int, Key | None] | None:
        """Give a key predicted for the next layer a slot ahead of its use (not counted as a hit
        or a miss): the prediction says it is needed within a layer, sooner than any resident's
        next use can be known, so the lowest-ranked resident makes room without the bypass
        test, except residents in `keep` (the rest of the same prediction). None when the
        layer has no slots or only kept residents."""
        if key in self._slot:
            return None
        return self._place(key, lambda part: self._lowest(part, keep), self._on_predict)

    def _place(self, key: Key, choose_victim, before_admit=None) -> tuple[int, Key | None] | None:
        """A free slot of key's partition, else the slot of choose_victim(part) (None: no room)."""
        part = self._part(key)
        if part >= len(self._free) or self._sizes[part] == 0:
            return None
        if self._free[part]:
            slot, victim = self._free[part].pop(), None
        else:
            victim = choose_victim(part)
            if victim is None:
                return None
            slot = self._slot.pop(victim)
            self._on_evict(victim)
            self.num_evictions += 1
        if before_admit is not None:
            before_admit(key)
        self._slot[key] = slot
        self._on_admit(key)
        return slot, victim

    def evict(self, key: Key) -> int | None:
        """Drop key (e.g. its slot is needed elsewhere); returns the freed slot or None."""
        slot = self._slot.pop(key, None)
        if slot is not None:
            self._on_evict(key)
            self._free[self._part(key)].append(slot)
        return slot

    def access(self, key: Key) -> bool:
        """lookup, then admit on a miss; True on a hit (what a simulator does per use)."""
        if self.lookup(key) is not None:
            return True
        self.admit(key)
        return False

    def seed(self, counts: Counts) -> None:
        """Warm the cache from routing counts (e.g. the prefill's): hottest keys admitted."""
        for key, _ in sorted(_counts_items(counts), key=lambda kc: -kc[1]):
            part = self._part(key)
            if part < len(self._free) and self._free[part] and key not in self._slot:
                self._slot[key] = self._free[part].pop()
                self._on_admit(key)

    # Hooks for subclasses.
    def _on_hit(self, key: Key) -> None: ...
    def _on_miss(self, key: Key) -> None: ...
    def _on_admit(self, key: Key) -> None: ...
    def _on_evict(self, key: Key) -> None: ...
    def _on_predict(self, key: Key) -> None: ...

    def _victim(self, key: Key, part: int) -> Key | None:
        raise NotImplementedError

    def _lowest(self, part: int, keep: frozenset[Key] | set[Key]) -> Key | None:
        """The resident of `part` the policy ranks lowest, skipping `keep`."""
        raise NotImplementedError


class LRUPolicy(CachePolicy):
    """Least recently used; always admits (no bypass)."""

    def __init__(self, capacity: int | None = None,
                 slots_per_layer: Sequence[int] | None = None) -> None:
        super().__init__(capacity, slots_per_layer)
        self._order: list[OrderedDict[Key, None]] = [OrderedDict() for _ in self._sizes]

    def _on_hit(self, key: Key) -> None:
        self._order[self._part(key)].move_to_end(key)

    def _on_admit(self, key: Key) -> None:
        self._order[self._part(key)][key] = None

    def _on_evict(self, key: Key) -> None:
        del self._order[self._part(key)][key]

    def _victim(self, key: Key, part: int) -> Key | None:
        return next(iter(self._order[part]))

    def _lowest(self, part: int, keep: frozenset[Key] | set[Key]) -> Key | None:
        return next((k for k in self._order[part] if k not in keep), None)

    def seed(self, counts: Counts) -> None:
        super().seed(counts)  # admitted hottest first, so the hottest become least recent ...
        for order in self._order:  # ... reverse: the hottest are the most recent
            for key in reversed(list(order)):
                order.move_to_end(key)


class LRFUPolicy(CachePolicy):
    """Decayed frequency (LRFU) with bypass admission.

    Every key, resident or not, has a score: the sum over its past uses of 2^(-age/half_life),
    age counted in uses of the key's layer (K per token). The victim is the resident with the
    lowest score; a missed key is admitted only when its score beats the victim's by
    `admit_margin` (log2 units), so a one-off miss does not evict a hot expert. Scores are
    kept as log2 of the sum scaled to a fixed origin, so comparisons never need rescaling.
    """

    def __init__(self, capacity: int | None = None,
                 slots_per_layer: Sequence[int] | None = None, half_life: float = 64.0,
                 admit_margin: float = 0.0) -> None:
        super().__init__(capacity, slots_per_layer)
        self.half_life = half_life
        self.admit_margin = admit_margin
        self._clock: dict[int, int] = {}  # uses so far per layer
        # Added to every layer's clock (in half-lives): a subclass advances it to forget the
        # past at once; old scores keep their order, so no heap needs rebuilding.
        self._offset = 0.0
        self._score: dict[Key, float] = {}  # log2(sum 2^(t_use / half_life))
        self._before_prediction: dict[Key, float | None] = {}  # admitted by prefetch, not yet used
        self._heaps: list[list[tuple[float, Key]]] = [[] for _ in self._sizes]

    def _touch(self, key: Key) -> float:
        layer = key[0]
        now = self._clock.get(layer, 0) / self.half_life + self._offset
        self._clock[layer] = self._clock.get(layer, 0) + 1
        # A predicted key's standing use is replaced by the real one, not added to it.
        old = self._before_prediction.pop(key) if key in self._before_prediction else \
            self._score.get(key)
        if old is None:
            new = now
        else:  # log2(2^old + 2^now) without overflow
            high, low = (old, now) if old > now else (now, old)
            new = high + math.log2(1.0 + 2.0 ** (low - high))
        self._score[key] = new
        return new

    def _push(self, key: Key) -> None:
        heap = self._heaps[self._part(key)]
        heapq.heappush(heap, (self._score[key], key))
        if len(heap) > 4 * len(self._slot) + 64:  # drop stale entries now and then
            part = self._part(key)
            fresh = [(self._score[k], k) for k in self._slot if self._part(k) == part]
            heapq.heapify(fresh)
            self._heaps[part] = fresh

    def _on_hit(self, key: Key) -> None:
        self._touch(key)
        self._push(key)

    def _on_miss(self, key: Key) -> None:
        self._touch(key)

    def _on_admit(self, key: Key) -> None:
        self._push(key)

    def preference(self, key: Key) -> float:
        return self._score.get(key, -math.inf)

    def _victim(self, key: Key, part: int) -> Key | None:
        heap = self._heaps[part]
        while heap:
            score, victim = heap[0]
            if victim in self._slot and self._score[victim] == score:
                break
            heapq.heappop(heap)  # stale: evicted or re-scored since
        else:
            return None
        return victim if self._score[key] > score + self.admit_margin else None

    def _lowest(self, part: int, keep: frozenset[Key] | set[Key]) -> Key | None:
        heap, kept, found = self._heaps[part], [], None
        while heap:
            score, victim = heapq.heappop(heap)
            if victim not in self._slot or self._score[victim] != score:
                continue  # stale
            if victim in keep:
                kept.append((score, victim))
                continue
            found = victim  # its entry is gone with it: the caller evicts it
            break
        for entry in kept:
            heapq.heappush(heap, entry)
        return found

    def _on_predict(self, key: Key) -> None:
        """Until its use, a predicted key ranks as if used now (without advancing the layer's
        clock); the real use then replaces that standing use instead of adding to it, and a
        mispredicted key keeps it and ages like any once-used expert."""
        now = self._clock.get(key[0], 0) / self.half_life + self._offset
        old = self._score.get(key)
        self._before_prediction[key] = old
        self._score[key] = now if old is None else max(old, now) + math.log2(1.0 + 2.0 ** -abs(old - now))

    def seed(self, counts: Counts) -> None:
        """Scores from counts, scaled per layer to a decayed window's total (~1.44 half-lives)."""
        items = _counts_items(counts)
        totals: dict[int, float] = {}
        for (layer, _), c in items:
            totals[layer] = totals.get(layer, 0.0) + c
        window = self.half_life / math.log(2)  # sum over ages of 2^(-age/half_life)
        for (layer, expert), c in items:
            now = self._clock.get(layer, 0) / self.half_life + self._offset
            self._score[(layer, expert)] = now + math.log2(c * window / totals[layer])
        super().seed(counts)


class ShiftLRFUPolicy(LRFUPolicy):
    """LRFU with a long memory that forgets at once when the routing's popularity shifts.

    Routing popularity is piecewise stationary (a document section favours a set of experts,
    then the next one favours another, in all layers at the same token). Within a section a
    long half-life estimates popularity best; across a shift it keeps yesterday's experts too
    long. So: a long half-life, plus a change detector that, on a shift, advances the clock by
    `jump` half-lives, dividing every old score by 2^jump (new experts then win slots at once).

    The detector watches novelty, not misses (misses depend on the cache size and warm-up):
    the share of uses whose key was not used in the layer's last `novelty_window` uses. It
    runs a Bernoulli CUSUM over all layers' uses, novelty rate p0 (tracked slowly) against
    p0 + 0.4; it fires above `threshold + threshold_per_log_layer * ln(layers)` nats, as more
    layers give more uses per token (and false alarms) but also a clearer shift. One jump per
    `cooldown` uses per layer: the new section's experts stay novel for a few tokens.
    Per use the extra work is a dict look-up and a few float operations.
    """

    def __init__(self, capacity: int | None = None,
                 slots_per_layer: Sequence[int] | None = None, half_life: float = 512.0,
                 admit_margin: float = 0.0, jump: float = 6.0, novelty_window: int = 128,
                 threshold: float = 3.75, threshold_per_log_layer: float = 1.35,
                 cooldown: int = 64) -> None:
        super().__init__(capacity, slots_per_layer, half_life, admit_margin)
        self.jump = jump
        self.novelty_window = novelty_window
        self.threshold, self.threshold_per_log_layer = threshold, threshold_per_log_layer
        self.cooldown = cooldown
        self.num_shifts = 0
        self._last_use: dict[Key, int] = {}  # the layer clock at each key's last use
        self._num_layers = 0
        self._p0 = 0.25  # novelty rate in a steady section, tracked over ~512 uses per layer
        self._cusum = 0.0
        self._uses = 0
        self._quiet_until = 0  # no jump before this many uses (all layers)
        self._grow(len(self._sizes) if self.is_per_layer else 1)

    def _grow(self, num_layers: int) -> None:
        """Scale the detector to the layers seen (a global pool learns them as they come)."""
        self._num_layers = num_layers
        self._limit = self.threshold + self.threshold_per_log_layer * math.log(num_layers)
        self._rates()

    def _rates(self) -> None:
        p0 = min(max(self._p0, 0.02), 0.9)
        p1 = min(0.97, p0 + 0.4)
        self._llr_novel = math.log(p1 / p0)
        self._llr_seen = math.log((1.0 - p1) / (1.0 - p0))

    def _touch(self, key: Key) -> float:
        layer = key[0]
        if layer >= self._num_layers:
            self._grow(layer + 1)
        clock = self._clock.get(layer, 0)
        last = self._last_use.get(key)
        self._last_use[key] = clock
        novel = last is None or clock - last > self.novelty_window
        self._uses += 1
        self._p0 += (novel - self._p0) / (512.0 * self._num_layers)
        if self._uses % 64 == 0:
            self._rates()
        cusum = self._cusum + (self._llr_novel if novel else self._llr_seen)
        if cusum <= 0.0:
            cusum = 0.0
        elif cusum > self._limit:
            cusum = 0.0
            if self._uses >= self._quiet_until:
                self._offset += self.jump
                self.num_shifts += 1
                self._quiet_until = self._uses + self.cooldown * self._num_layers
        self._cusum = cusum
        return super()._touch(key)


def simulate(policy: CachePolicy, trace: np.ndarray) -> float:
    """Replay a [T, L, K] trace through policy (lookup, admit on miss); the hit rate of it."""
    hits0, misses0 = policy.num_hits, policy.num_misses
    access = policy.access
    num_layers = trace.shape[1]
    for token in trace.tolist():
        for layer in range(num_layers):
            for expert in token[layer]:
                access((layer, expert))
    total = policy.num_hits - hits0 + policy.num_misses - misses0
    return (policy.num_hits - hits0) / total if total else 0.0


def _next_use(seq: np.ndarray) -> np.ndarray:
    """For each position, the position of the next use of the same key (len(seq) if none)."""
    order = np.argsort(seq, kind="stable")
    nxt = np.full(len(seq), len(seq), dtype=np.int64)
    same = seq[order[1:]] == seq[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def _belady_hits(seq: np.ndarray, capacity: int, bypass: bool, start: int = 0) -> int:
    """Hits of MIN on one stream at positions >= start (the earlier ones only warm it up):
    evict the furthest next use; with bypass, admit only if the newcomer's next use is
    sooner than the furthest resident's."""
    if capacity <= 0:
        return 0
    nxt = _next_use(seq).tolist()
    never = len(seq)
    resident: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily cleaned
    hits = 0
    for i, key in enumerate(seq.tolist()):
        if key in resident:
            hits += i >= start
        elif len(resident) >= capacity:
            while -heap[0][0] != resident.get(heap[0][1]):
                heapq.heappop(heap)
            far = -heap[0][0]
            if bypass and nxt[i] >= far:
                continue
            del resident[heapq.heappop(heap)[1]]
        elif bypass and nxt[i] == never:
            continue
        resident[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return hits


def belady_hit_rate(trace: np.ndarray, capacity: int | Sequence[int], per_layer: bool = True,
                    bypass: bool = True, warmup_tokens: int = 0) -> float:
    """Offline optimum hit rate (Belady's MIN, with bypass by default) for a [T, L, K] trace.

    capacity: slots per layer (an int for every layer, or one per layer) when per_layer,
    else the size of one global pool over all layers' experts. warmup_tokens: the first
    tokens only fill the cache and are not counted, as when an online policy's hit rate is
    measured after a warm-up on the same trace (a cold-start optimum would flatter it).
    """
    num_tokens, num_layers, k = trace.shape
    total = (num_tokens - warmup_tokens) * num_layers * k
    if total <= 0:
        return 0.0
    if not per_layer:
        if not isinstance(capacity, int):
            raise ValueError("a global pool takes one capacity")
        num_experts = int(trace.max()) + 1
        keys = (np.arange(num_layers)[None, :, None] * num_experts + trace).ravel()
        return _belady_hits(keys, capacity, bypass, warmup_tokens * num_layers * k) / total
    sizes = [capacity] * num_layers if isinstance(capacity, int) else list(capacity)
    hits = sum(_belady_hits(trace[:, layer, :].ravel().astype(np.int64), sizes[layer], bypass,
                            warmup_tokens * k)
               for layer in range(num_layers))
    return hits / total

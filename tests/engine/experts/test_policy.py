"""Expert-cache policies: exact counts on hand-made traces, and LRU vs LRFU vs Belady on traces."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from engine.experts.policy import (
    CachePolicy,
    LRFUPolicy,
    LRUPolicy,
    ShiftLRFUPolicy,
    belady_hit_rate,
    simulate,
)
from engine.experts.traces import random_trace, routing_counts, synthetic_trace
from engine.placement import GpuInfo, ModelShape, plan_placement

A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


def run(policy: CachePolicy, keys: list[tuple[int, int]]) -> list[bool]:
    return [policy.access(k) for k in keys]


def one_layer(experts: list[int]) -> np.ndarray:
    """A [T, 1, 1] trace: one expert per token on one layer."""
    return np.array(experts, dtype=np.int16).reshape(-1, 1, 1)


def test_lru_exact_counts() -> None:
    lru = LRUPolicy(capacity=2)
    assert run(lru, [A, B, A, C, B, A]) == [False, False, True, False, False, False]
    assert (lru.num_hits, lru.num_misses, lru.num_evictions) == (1, 5, 3)
    assert lru.hit_rate == pytest.approx(1 / 6)
    assert set(lru.resident()) == {B, A}


def test_lookup_admit_protocol_and_slots() -> None:
    lru = LRUPolicy(capacity=2)
    assert lru.lookup(A) is None
    assert lru.admit(A) == (0, None)
    assert lru.admit(B) == (1, None)
    assert lru.lookup(A) == 0
    assert lru.admit(C) == (1, B)  # B is least recent: C takes its slot
    assert lru.peek(B) is None and lru.peek(C) == 1
    assert lru.evict(A) == 0 and A not in lru
    assert lru.admit(D) == (0, None)  # the freed slot is reused
    assert (lru.num_hits, lru.num_misses) == (1, 1)  # admit/evict/peek count nothing


def test_per_layer_budgets_are_separate() -> None:
    lru = LRUPolicy(slots_per_layer=[1, 2])
    keys = [(1, 0), (1, 1), (0, 5), (1, 0), (1, 1), (0, 6), (0, 5)]
    assert run(lru, keys) == [False, False, False, True, True, False, False]
    slots = lru.resident()
    assert slots[(1, 0)] in (1, 2) and slots[(1, 1)] in (1, 2) and slots[(0, 5)] == 0
    zero = LRUPolicy(slots_per_layer=[0, 1])
    assert zero.admit((0, 3)) is None and zero.num_bypasses == 1


def test_lrfu_one_off_miss_does_not_evict_a_hot_expert() -> None:
    keys = [A, A, A, B, A, C, A, D, A]  # A is hot; B, C, D appear once each
    lrfu = LRFUPolicy(capacity=1, half_life=8)
    assert run(lrfu, keys) == [False, True, True, False, True, False, True, False, True]
    assert (lrfu.num_hits, lrfu.num_bypasses, lrfu.num_evictions) == (5, 3, 0)
    lru = LRUPolicy(capacity=1)
    assert sum(run(lru, keys)) == 2  # LRU lets every one-off push A out


def test_lrfu_admits_a_newcomer_once_it_is_hotter() -> None:
    lrfu = LRFUPolicy(capacity=1, half_life=2)
    run(lrfu, [A, A])
    # B used four times in a row: its decayed score passes A's and it replaces A.
    assert run(lrfu, [B, B, B, B]) == [False, False, True, True]
    assert lrfu.resident() == {B: 0} and lrfu.num_evictions == 1


def test_seed_from_prefill_counts() -> None:
    counts = np.zeros((2, 8))
    counts[0, [1, 2, 3]] = [10, 50, 5]
    counts[1, [4, 7]] = [3, 9]
    for policy in (LRUPolicy(slots_per_layer=[2, 1]), LRFUPolicy(slots_per_layer=[2, 1]),
                   ShiftLRFUPolicy(slots_per_layer=[2, 1])):
        policy.seed(counts)
        assert set(policy.resident()) == {(0, 2), (0, 1), (1, 7)}
        assert policy.lookup((0, 2)) is not None and policy.num_hits == 1
    lru = LRUPolicy(slots_per_layer=[2, 1])
    lru.seed({(0, 1): 10, (0, 2): 50})
    lru.access((0, 6))  # evicts the colder seeded expert, not the hottest
    assert set(lru.resident()) == {(0, 2), (0, 6)}


def test_lrfu_seeded_scores_protect_prefill_hot_experts() -> None:
    lrfu = LRFUPolicy(capacity=1, half_life=16)
    lrfu.seed({A: 100})
    assert run(lrfu, [B, C, A]) == [False, False, True]


def test_shift_lrfu_forgets_the_old_section_at_once() -> None:
    E, F = (0, 4), (0, 5)
    keys = [A, B] * 20 + [C, D, E, F] + [C, D] * 3  # a steady section, then a new one
    shift = ShiftLRFUPolicy(slots_per_layer=[2], half_life=8, novelty_window=4)
    hits = run(shift, keys)
    assert hits[:2] == [False, False] and all(hits[2:40])
    # Four novel uses in a row pass the CUSUM (4 x 1.05 > 3.75 nats) at F: the clock jumps,
    # so F, then C and D (now hotter than the old, faded A and B) take the slots.
    assert hits[40:] == [False] * 6 + [True] * 4
    assert shift.num_shifts == 1 and set(shift.resident()) == {C, D}
    assert (shift.num_bypasses, shift.num_evictions) == (3, 3)  # C, D, E bypassed first
    lrfu = LRFUPolicy(slots_per_layer=[2], half_life=8)  # the same decay, no detector
    assert not any(run(lrfu, keys)[40:])  # C and D never catch up with A and B in time


def test_shift_lrfu_keeps_steady_routing_and_its_hot_keys() -> None:
    shift = ShiftLRFUPolicy(slots_per_layer=[1], half_life=8, novelty_window=4)
    keys = [A, A, A, B, A, C, A, D, A] * 3  # one-offs at a steady rate are no shift
    hits = run(shift, keys)
    assert sum(hits) == 17 and shift.num_shifts == 0  # every A but the first
    assert hits == run(LRFUPolicy(slots_per_layer=[1], half_life=8), keys)
    assert shift.resident() == {A: 0}
    pool = ShiftLRFUPolicy(capacity=4)
    run(pool, [(3, 0), (0, 1)])  # a global pool scales its threshold to the layers seen
    assert pool._limit == pytest.approx(3.75 + 1.35 * np.log(4))


def test_belady_exact_and_bypass_matters() -> None:
    trace = one_layer([0, 1, 2, 0, 1])  # A B C A B with two slots
    assert belady_hit_rate(trace, 2, bypass=True) == pytest.approx(2 / 5)  # C bypassed
    assert belady_hit_rate(trace, 2, bypass=False) == pytest.approx(1 / 5)  # C evicts B
    lru = LRUPolicy(capacity=2)
    assert simulate(lru, trace) == 0.0
    looping = one_layer([0, 1, 2] * 20)  # a loop one larger than the cache
    assert simulate(LRUPolicy(capacity=2), looping) == 0.0
    assert belady_hit_rate(looping, 2) > belady_hit_rate(looping, 2, bypass=False)
    assert belady_hit_rate(looping, 2) == pytest.approx(38 / 60)  # 2 of 3 after the first lap


def test_belady_global_pool_and_per_layer_sizes() -> None:
    trace = np.array([[[0], [0]], [[1], [0]], [[0], [0]]], dtype=np.int16)  # [T=3, L=2, K=1]
    assert belady_hit_rate(trace, 1, per_layer=False) == pytest.approx(2 / 6)
    assert belady_hit_rate(trace, 2, per_layer=False) == pytest.approx(3 / 6)
    assert belady_hit_rate(trace, [0, 1]) == pytest.approx(2 / 6)  # only layer 1 caches
    assert belady_hit_rate(trace, [1, 1]) == pytest.approx(3 / 6)


@pytest.fixture(scope="module")
def synthetic() -> np.ndarray:
    return synthetic_trace(2000, seed=3)


@pytest.fixture(scope="module")
def uniform() -> np.ndarray:
    return random_trace(600, 36, 128, 4, seed=3)


@pytest.mark.parametrize("slots", [10, 19, 40])
def test_belady_bounds_online_policies(synthetic: np.ndarray, uniform: np.ndarray,
                                       slots: int) -> None:
    for trace in (synthetic[:600], uniform[:400]):
        optimum = belady_hit_rate(trace, slots)
        assert optimum >= belady_hit_rate(trace, slots, bypass=False)
        for policy in (LRUPolicy(slots_per_layer=[slots] * 36),
                       LRFUPolicy(slots_per_layer=[slots] * 36),
                       ShiftLRFUPolicy(slots_per_layer=[slots] * 36)):
            assert simulate(policy, trace) <= optimum


def test_lrfu_beats_lru_and_nears_belady_on_the_synthetic_trace(synthetic: np.ndarray) -> None:
    # Measured (seed 3, 2,000 tokens, per-layer slots): at 19 slots (15%) LRU 0.39,
    # LRFU 0.52, Belady 0.69; at 40 slots LRU 0.69, LRFU 0.76, Belady 0.85.
    for slots, min_gain, min_of_belady in ((19, 0.08, 0.72), (40, 0.04, 0.85)):
        lru = simulate(LRUPolicy(slots_per_layer=[slots] * 36), synthetic)
        lrfu = simulate(LRFUPolicy(slots_per_layer=[slots] * 36), synthetic)
        optimum = belady_hit_rate(synthetic, slots)
        assert lrfu >= lru + min_gain, (slots, lru, lrfu)
        assert lrfu >= min_of_belady * optimum, (slots, lrfu, optimum)


def test_shift_lrfu_nears_belady_on_the_calibrated_trace() -> None:
    # The acceptance setting: the 24 GiB plan's slots (first and last layer's counts), 64
    # warm-up tokens, then 256 measured against Belady with bypass that saw the same warm-up
    # (as the bench computes it). Measured (2 layers, seeds 0-3, 22 and 23 slots): ShiftLRFU
    # 0.821 mean (min 0.782), LRFU 0.804 (min 0.757); at 21 and 21, 0.808 and 0.790.
    plan = plan_placement(ModelShape.for_mistral_small_4(),
                          [GpuInfo(0, "H100", 85_520_000_000, 84_900_000_000)],
                          host_available_bytes=240 * 10**9, context_length=32768, gpu_budget="24GiB")
    sizes = [plan.slots_per_layer()[0], plan.slots_per_layer()[-1]]
    assert sizes == [22, 23]
    ratios: dict[type, list[float]] = {ShiftLRFUPolicy: [], LRFUPolicy: []}
    for seed in range(4):
        trace = synthetic_trace(320, 2, 128, 4, seed=seed)
        optimum = belady_hit_rate(trace, sizes, warmup_tokens=64)
        for cls, found in ratios.items():
            policy = cls(slots_per_layer=sizes)
            simulate(policy, trace[:64])
            found.append(simulate(policy, trace[64:]) / optimum)
    new, old = np.mean(ratios[ShiftLRFUPolicy]), np.mean(ratios[LRFUPolicy])
    assert new >= 0.81, ratios
    assert new >= old + 0.01, ratios
    assert min(ratios[ShiftLRFUPolicy]) >= 0.775, ratios


def test_global_pool_lrfu_beats_lru(synthetic: np.ndarray) -> None:
    short = synthetic[:800]
    lru = simulate(LRUPolicy(capacity=19 * 36), short)
    lrfu = simulate(LRFUPolicy(capacity=19 * 36), short)
    assert lrfu >= lru + 0.05
    assert lrfu <= belady_hit_rate(short, 19 * 36, per_layer=False)


def test_random_routing_gives_every_policy_the_cache_fraction(uniform: np.ndarray) -> None:
    for policy in (LRUPolicy(slots_per_layer=[19] * 36), LRFUPolicy(slots_per_layer=[19] * 36),
                   ShiftLRFUPolicy(slots_per_layer=[19] * 36)):
        assert simulate(policy, uniform) == pytest.approx(19 / 128, abs=0.02)


def test_seeding_from_prefill_helps_the_first_decode_tokens(synthetic: np.ndarray) -> None:
    prefill, decode = synthetic[:300], synthetic[300:340]
    cold = simulate(LRFUPolicy(slots_per_layer=[19] * 36), decode)
    warm_policy = LRFUPolicy(slots_per_layer=[19] * 36)
    warm_policy.seed(routing_counts(prefill, 128))
    assert simulate(warm_policy, decode) >= cold + 0.05  # measured 0.53 vs 0.44


def test_simulation_is_fast_enough() -> None:
    trace = random_trace(2000, 36, 128, 4, seed=0)
    start = time.perf_counter()
    simulate(LRFUPolicy(slots_per_layer=[19] * 36), trace)
    simulate(ShiftLRFUPolicy(slots_per_layer=[19] * 36), trace)  # ~1.5 us per use vs ~1.0
    belady_hit_rate(trace, 19)
    assert time.perf_counter() - start < 8.0  # ~1.5 s here; the brief asks for a couple


@pytest.mark.parametrize("make", [lambda: LRUPolicy(slots_per_layer=[2]),
                                  lambda: LRFUPolicy(slots_per_layer=[2]),
                                  lambda: ShiftLRFUPolicy(slots_per_layer=[2])],
                         ids=["lru", "lrfu", "shift"])
def test_prefetch_admission_evicts_the_lowest_but_never_the_same_prediction(make) -> None:
    policy = make()
    for key in [(0, 1), (0, 2), (0, 1), (0, 2), (0, 1)]:  # 1 and 2 resident and hot
        policy.access(key)
    hits, misses = policy.num_hits, policy.num_misses
    # A newcomer that a demand miss would bypass (LRFU: its score is below both residents')
    # still gets a slot when predicted; the second prediction may not evict the first.
    predicted = {(0, 5), (0, 6)}
    first = policy.admit_prefetch((0, 5), keep=predicted)
    assert first is not None and first[1] in {(0, 1), (0, 2)}
    second = policy.admit_prefetch((0, 6), keep=predicted)
    assert second is not None and second[1] in {(0, 1), (0, 2)} and second[1] != first[1]
    assert policy.admit_prefetch((0, 7), keep=predicted | {(0, 7)}) is None  # only kept residents
    assert policy.admit_prefetch((0, 5)) is None  # already resident: nothing to copy
    assert (0, 5) in policy and (0, 6) in policy and len(policy) == 2
    assert (policy.num_hits, policy.num_misses) == (hits, misses)  # not a use
    assert policy.lookup((0, 5)) is not None and policy.num_hits == hits + 1


def test_prefetch_admission_needs_slots() -> None:
    policy = LRFUPolicy(slots_per_layer=[0, 2])
    assert policy.admit_prefetch((0, 3)) is None
    assert policy.admit_prefetch((1, 3)) == (0, None)  # layer 1's first free slot (global id 0)


def test_belady_with_a_warm_up_counts_only_the_later_tokens() -> None:
    """The optimum that also saw the warm-up tokens: at least the cold optimum of the window,
    and exactly its hits over the later tokens (hand-made: 1 layer, 1 expert per token)."""
    trace = np.array([0, 1, 0, 1, 2, 0, 1], dtype=np.int16)[:, None, None]
    # capacity 2, bypass: 0 1 | 0 1 2 0 1 -> warm hits on 0,1 (2) + 2 bypassed + 0,1 hit (2) = 4 of 5
    assert belady_hit_rate(trace, 2, warmup_tokens=2) == pytest.approx(4 / 5)
    assert belady_hit_rate(trace[2:], 2) == pytest.approx(2 / 5)  # cold: 0 and 1 miss first
    tr = synthetic_trace(120, 3, 32, 2, seed=4)
    assert belady_hit_rate(tr, 5, warmup_tokens=40) >= belady_hit_rate(tr[40:], 5)
    assert belady_hit_rate(tr, 5, warmup_tokens=0) == belady_hit_rate(tr, 5)


@pytest.mark.parametrize("cls", [LRFUPolicy, ShiftLRFUPolicy], ids=["lrfu", "shift"])
def test_a_predicted_use_is_not_counted_twice(cls) -> None:
    """The standing use a prediction gives is replaced by the real use: a correctly predicted
    expert scores like one used once, and a mispredicted one keeps a single standing use."""
    predicted, demanded = cls(slots_per_layer=[4]), cls(slots_per_layer=[4])
    for policy in (predicted, demanded):
        for key in [(0, 1), (0, 2), (0, 3)]:
            policy.access(key)
    predicted.admit_prefetch((0, 7))
    predicted.lookup((0, 7))  # the predicted use happens: a hit
    demanded.lookup((0, 7))  # the same use, not predicted: a miss ...
    demanded.admit((0, 7))  # ... then cached
    assert predicted._score[(0, 7)] == pytest.approx(demanded._score[(0, 7)])
    assert predicted._before_prediction == {}


def test_forced_admission_takes_the_lowest_slot_outside_the_step():
    """A miss already bound for the GPU is cached even when the bypass test refuses it: the
    lowest-ranked resident that the step itself does not use makes room."""
    policy = LRFUPolicy(slots_per_layer=[2], half_life=64.0)
    for key in [(0, 1)] * 3 + [(0, 2)] * 6:  # both resident, 2 the hotter
        if policy.lookup(key) is None:
            policy.admit(key)
    assert policy.lookup((0, 7)) is None
    assert policy.admit((0, 7)) is None  # one use cannot beat either resident: bypassed
    assert policy.preference((0, 2)) > policy.preference((0, 1)) > policy.preference((0, 7))
    assert policy.preference((0, 5)) == -math.inf  # never seen: ranked last
    slot, evicted = policy.admit((0, 7), force=True, keep={(0, 7)})
    assert evicted == (0, 1) and policy.peek((0, 7)) == slot
    assert policy.lookup((0, 9)) is None
    assert policy.admit((0, 9), force=True, keep={(0, 2), (0, 7), (0, 9)}) is None  # no room
    slot, evicted = policy.admit((0, 9), force=True, keep={(0, 9)})
    assert evicted == (0, 7)  # the newcomer ranks below the hot resident
    assert policy.num_bypasses == 2

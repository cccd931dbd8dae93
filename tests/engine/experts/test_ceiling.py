"""Ceiling formulas against the prior-art note's worked table, and the PCIe/CPU miss split."""

from __future__ import annotations

import pytest

from engine.experts.ceiling import (
    EXPERT_BYTES,
    decode_ceiling,
    decode_ceilings,
    experts_touched,
    missed_bytes_per_token,
    prefill_ceiling,
    resident_time,
    split_misses,
    split_streamed,
    split_time,
)

B_P, B_C = 53.9e9, 60e9  # H100 test machine: measured pinned PCIe, assumed FP8 CPU kernel


def test_missed_bytes() -> None:
    assert missed_bytes_per_token(0.0) == 144 * EXPERT_BYTES  # 3.62 GB
    assert missed_bytes_per_token(1.0) == 0
    with pytest.raises(ValueError):
        missed_bytes_per_token(1.5)


@pytest.mark.parametrize(("hit_rate", "resident_s", "row"), [
    (0.15, 1.5e-3, (17.6, 19.6, 37, 35)),  # 24 GiB budget, random routing
    (0.50, 2.0e-3, (30, 33, 63, 56)),  # 24 GiB, locality
    (0.85, 2.5e-3, (99, 110, 210, 137)),  # 70 GiB, locality
])
def test_worked_table_for_the_h100(hit_rate: float, resident_s: float, row: tuple) -> None:
    c = decode_ceilings(hit_rate, B_P, B_C, resident_s)
    got = (c.pcie_only, c.cpu_only, c.hybrid, c.hybrid_no_prefetch)
    assert got == pytest.approx(row, rel=0.02)


def test_ceiling_is_capped_by_resident_time() -> None:
    assert decode_ceiling(1.0, B_P, resident_s=2e-3) == pytest.approx(500)
    assert decode_ceiling(0.0, B_P, B_C, resident_s=0.1) == pytest.approx(10)
    assert decode_ceiling(0.5, B_P, overlap=False, resident_s=1e-3) < decode_ceiling(
        0.5, B_P, resident_s=1e-3)


def test_resident_time_formula() -> None:
    # 2.5 GB dense + 144 x 0.5 x 25.2 MB + 0.75 GB KV at 3 TB/s, plus 0.5 ms launches
    t = resident_time(0.5, 3e12, kv_bytes=0.75e9, overhead_s=0.5e-3)
    assert t == pytest.approx((2.5e9 + 72 * EXPERT_BYTES + 0.75e9) / 3e12 + 0.5e-3)


@pytest.mark.parametrize(("num_misses", "pcie", "cpu"), [
    (144, B_P, B_C), (4, 25e9, 55e9), (7, 54e9, 54e9), (1, 10e9, 60e9), (0, 1e9, 1e9),
    (100, 24e9, 150e9),
])
def test_split_misses_balances_the_two_paths(num_misses: int, pcie: float, cpu: float) -> None:
    n_copy, n_cpu = split_misses(num_misses, EXPERT_BYTES, pcie, cpu)
    assert n_copy + n_cpu == num_misses and min(n_copy, n_cpu) >= 0
    best = split_time(num_misses, EXPERT_BYTES, pcie, cpu)
    for other in range(num_misses + 1):  # no other integer split finishes sooner
        t = max(other * EXPERT_BYTES / pcie, (num_misses - other) * EXPERT_BYTES / cpu)
        assert best <= t + 1e-15
    if num_misses >= 20:  # the two finish within one expert of each other
        gap = abs(n_copy * EXPERT_BYTES / pcie - n_cpu * EXPERT_BYTES / cpu)
        assert gap <= EXPERT_BYTES / min(pcie, cpu)


def test_split_misses_edges_and_latency() -> None:
    assert split_misses(144, EXPERT_BYTES, B_P, B_C) == (68, 76)
    assert split_misses(10, EXPERT_BYTES, B_P, 0.0) == (10, 0)
    assert split_misses(10, EXPERT_BYTES, 0.0, B_C) == (0, 10)
    # A 1 ms CPU hand-off makes one miss cheaper to copy even though the CPU is faster.
    assert split_misses(1, EXPERT_BYTES, 25e9, 55e9) == (0, 1)
    assert split_misses(1, EXPERT_BYTES, 25e9, 55e9, cpu_latency_s=1e-3) == (1, 0)
    with pytest.raises(ValueError):
        split_misses(-1, EXPERT_BYTES, B_P, B_C)


def test_split_streamed_gives_the_cpu_the_fewest_token_experts() -> None:
    # Equal rates and one token each: half the copies' time goes to the CPU.
    assert split_streamed([1, 1, 1, 1], EXPERT_BYTES, 50e9, 50e9, 1e6) == [0, 1]
    # The CPU takes the experts with the fewest tokens, while it finishes before the copies.
    assert split_streamed([50, 1, 2, 40, 3, 60], EXPERT_BYTES, 50e9, 50e9, 1e4) == [1, 2, 4]
    # A 16K chunk's experts (~500 tokens each) cost the CPU far more than their copy.
    assert split_streamed([500] * 128, EXPERT_BYTES, B_P, B_C, 20_000.0) == []
    assert split_streamed([65] * 128, EXPERT_BYTES, B_P, B_C, 1e9) == []  # beyond the measured
    # A short follow-up question: most of a layer's misses have 1-4 tokens, and the CPU's
    # share ends no later than the copies of the rest.
    counts = [1] * 40 + [2] * 30 + [3] * 20 + [4] * 10
    chosen = split_streamed(counts, EXPERT_BYTES, B_P, B_C, 20_000.0)
    cpu_s = sum(max(EXPERT_BYTES / B_C, counts[i] / 20_000.0) for i in chosen)
    copy_s = (len(counts) - len(chosen)) * EXPERT_BYTES / B_P
    assert 40 <= len(chosen) <= 55 and cpu_s <= copy_s
    assert cpu_s + max(EXPERT_BYTES / B_C, counts[len(chosen)] / 20_000.0) > copy_s - EXPERT_BYTES / B_P
    # No CPU path: nothing; no PCIe: everything.
    assert split_streamed([1, 2], EXPERT_BYTES, B_P, 0.0, 1e4) == []
    assert split_streamed([2, 1, 65], EXPERT_BYTES, 0.0, B_C, 1e4) == [1, 0]


def test_prefill_ceiling_matches_the_note() -> None:
    assert experts_touched(1024) == pytest.approx(128, abs=0.01)
    assert experts_touched(1) == pytest.approx(4)
    # H100, 24 GiB budget (15.5% resident): 1.8 s per pass, ~9,000 t/s at 16K, ~18,000 at 32K.
    assert prefill_ceiling(16384, 16384, B_P, 5e14, 0.155).tokens_per_s == pytest.approx(9000, rel=0.02)
    assert prefill_ceiling(32768, 32768, B_P, 5e14, 0.155).tokens_per_s == pytest.approx(18000, rel=0.02)
    long = prefill_ceiling(131072, 32768, B_P, 5e14, 0.155)
    assert len(long.chunk_seconds) == 4 and 10 < long.seconds < 25  # note: ~15-25 s
    assert long.chunk_seconds[-1] > long.chunk_seconds[0]  # attention grows with context

"""Decode and prefill ceilings for expert offload, and the PCIe/CPU split of a step's misses.

The formulas of the prior-art note, section 4 (design/performance.md, "Where the time goes"):
missed bytes per token M = U (1 - h) S; miss time t_m = M / (B_P + B_C) when PCIe copies and
CPU compute run at once (B_C = 0 for PCIe only); hard ceiling 1 / max(t_g, t_m); without
prefetch ~1 / (t_g + t_m). Bandwidths in bytes per second, times in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Mistral Small 4 defaults (prior-art 4.1).
EXPERT_BYTES = 3 * 4096 * 2048  # FP8 gate + up + down: 25,165,824
USES_PER_TOKEN = 36 * 4  # layers x experts per token
HOST_EXPERT_BYTES = 36 * 128 * EXPERT_BYTES  # ~116 GB
FLOPS_PER_TOKEN = 13e9  # active weights, without attention
ATTENTION_FLOPS_PER_SQUARED_TOKEN = 295_000  # MS4 prefill attention ~ 295,000 x P^2 FLOPs


def missed_bytes_per_token(hit_rate: float, uses_per_token: int = USES_PER_TOKEN,
                           expert_bytes: int = EXPERT_BYTES) -> float:
    """M = U x (1 - h) x S."""
    if not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit rate must be in [0, 1], got {hit_rate}")
    return uses_per_token * (1.0 - hit_rate) * expert_bytes


def resident_time(hit_rate: float, hbm_bps: float, dense_bytes: float = 2.5e9,
                  kv_bytes: float = 0.0, overhead_s: float = 0.0,
                  uses_per_token: int = USES_PER_TOKEN, expert_bytes: int = EXPERT_BYTES) -> float:
    """t_g = (W_g + U h S + KV(c)) / B_HBM + launch/sync overhead."""
    return (dense_bytes + uses_per_token * hit_rate * expert_bytes + kv_bytes) / hbm_bps + overhead_s


def miss_time(hit_rate: float, pcie_bps: float, cpu_bps: float = 0.0,
              uses_per_token: int = USES_PER_TOKEN, expert_bytes: int = EXPERT_BYTES) -> float:
    """t_m = M / (B_P + B_C): PCIe copies and CPU compute sharing a token's misses."""
    rate = pcie_bps + cpu_bps
    if rate <= 0:
        raise ValueError("need a positive PCIe or CPU bandwidth")
    return missed_bytes_per_token(hit_rate, uses_per_token, expert_bytes) / rate


def decode_ceiling(hit_rate: float, pcie_bps: float, cpu_bps: float = 0.0,
                   resident_s: float = 0.0, overlap: bool = True,
                   uses_per_token: int = USES_PER_TOKEN, expert_bytes: int = EXPERT_BYTES) -> float:
    """Decode tok/s bound: 1 / max(t_g, t_m) with overlap (the hard ceiling), else 1 / (t_g + t_m).

    cpu_bps = 0 gives the PCIe-only ceiling; pcie_bps = 0 the CPU-only one.
    """
    t_m = miss_time(hit_rate, pcie_bps, cpu_bps, uses_per_token, expert_bytes)
    t = max(resident_s, t_m) if overlap else resident_s + t_m
    return math.inf if t == 0 else 1.0 / t


@dataclass(frozen=True)
class DecodeCeilings:
    """The rows of the prior-art 4.3 table for one machine and hit rate (tok/s)."""

    pcie_only: float
    cpu_only: float
    hybrid: float
    hybrid_no_prefetch: float


def decode_ceilings(hit_rate: float, pcie_bps: float, cpu_bps: float, resident_s: float,
                    uses_per_token: int = USES_PER_TOKEN,
                    expert_bytes: int = EXPERT_BYTES) -> DecodeCeilings:
    """PCIe only, CPU only, hybrid, and hybrid without prefetch, as in the note's table. A path
    without a rate (no CPU path measured) has a ceiling of 0."""
    def ceiling(p: float, c: float, overlap: bool = True) -> float:
        if p <= 0 and c <= 0:
            return 0.0
        return decode_ceiling(hit_rate, p, c, resident_s, overlap, uses_per_token, expert_bytes)

    return DecodeCeilings(ceiling(pcie_bps, 0.0), ceiling(0.0, cpu_bps),
                          ceiling(pcie_bps, cpu_bps), ceiling(pcie_bps, cpu_bps, overlap=False))


def split_misses(num_misses: int, bytes_per_expert: int, pcie_bps: float, cpu_bps: float,
                 pcie_latency_s: float = 0.0, cpu_latency_s: float = 0.0) -> tuple[int, int]:
    """(n_copy, n_cpu): the split of a step's misses that finishes both paths soonest.

    Continuous optimum n_copy = m B_P / (B_P + B_C) (FreeToken's q*); the integers around it
    are compared, with a fixed latency added to a path that gets any work. Ties go to copies,
    which also warm the cache.
    """
    if num_misses < 0:
        raise ValueError("num_misses cannot be negative")
    if cpu_bps <= 0 and pcie_bps <= 0:
        raise ValueError("need a positive PCIe or CPU bandwidth")
    if cpu_bps <= 0:
        return num_misses, 0
    if pcie_bps <= 0:
        return 0, num_misses

    def finish(n_copy: int) -> float:
        n_cpu = num_misses - n_copy
        t_copy = n_copy * bytes_per_expert / pcie_bps + (pcie_latency_s if n_copy else 0.0)
        t_cpu = n_cpu * bytes_per_expert / cpu_bps + (cpu_latency_s if n_cpu else 0.0)
        return max(t_copy, t_cpu)

    ideal = num_misses * pcie_bps / (pcie_bps + cpu_bps)
    candidates = {0, num_misses, math.floor(ideal), math.ceil(ideal)}
    best = min(sorted(candidates, reverse=True), key=finish)
    return best, num_misses - best


def split_time(num_misses: int, bytes_per_expert: int, pcie_bps: float, cpu_bps: float) -> float:
    """Seconds to serve num_misses with the best split (no latencies)."""
    n_copy, n_cpu = split_misses(num_misses, bytes_per_expert, pcie_bps, cpu_bps)
    t_copy = n_copy * bytes_per_expert / pcie_bps if n_copy else 0.0
    t_cpu = n_cpu * bytes_per_expert / cpu_bps if n_cpu else 0.0
    return max(t_copy, t_cpu)


def split_streamed(token_counts: Sequence[int], bytes_per_expert: int, pcie_bps: float,
                   cpu_bps: float, cpu_tokens_per_s: float, max_tokens: int = 64) -> list[int]:
    """Which of a prefill chunk's streamed experts the CPU computes (indices into token_counts),
    so that its work ends no later than the PCIe copies of the rest.

    A copy costs S / B_P whatever the tokens; on the CPU an expert costs max(S / B_C, t / R_C):
    reading its weights once, or its t tokens at R_C tokens per second, whichever is slower. So
    experts with the fewest tokens go to the CPU first: a short follow-up question's chunk
    (t of 1-4 for most experts) shares its misses like a decode step, a 16K chunk's
    (t ~ 500) stays on the GPU. R_C is measured at 64 tokens (engine.bench.machine), so no
    expert with more than max_tokens is sent: the rate is not extrapolated.
    """
    if cpu_bps <= 0 or cpu_tokens_per_s <= 0:
        return []
    order = sorted((i for i, t in enumerate(token_counts) if t <= max_tokens),
                   key=token_counts.__getitem__)
    if pcie_bps <= 0:
        return order
    copy_s = bytes_per_expert / pcie_bps
    copies_s, cpu_s = copy_s * len(order), 0.0
    chosen: list[int] = []
    for i in order:
        cost = max(bytes_per_expert / cpu_bps, token_counts[i] / cpu_tokens_per_s)
        if cpu_s + cost > copies_s - copy_s:
            break
        cpu_s, copies_s = cpu_s + cost, copies_s - copy_s
        chosen.append(i)
    return chosen


def experts_touched(num_tokens: int, num_experts: int = 128, experts_per_token: int = 4) -> float:
    """Expected distinct experts a chunk of num_tokens uses in one layer (uniform routing)."""
    return num_experts * (1.0 - (1.0 - experts_per_token / num_experts) ** num_tokens)


def attention_flops(start: int, end: int) -> float:
    """Prefill attention FLOPs for tokens start..end after start tokens of context."""
    return ATTENTION_FLOPS_PER_SQUARED_TOKEN * (end * end - start * start)


def prefill_chunk_time(chunk_tokens: int, pcie_bps: float, gpu_flops: float,
                       resident_fraction: float = 0.0, context_before: int = 0,
                       num_layers: int = 36, num_experts: int = 128, experts_per_token: int = 4,
                       expert_bytes: int = EXPERT_BYTES,
                       flops_per_token: float = FLOPS_PER_TOKEN) -> float:
    """t_chunk >= max(stream of the non-resident experts it touches, weights + attention compute)."""
    touched = experts_touched(chunk_tokens, num_experts, experts_per_token)
    stream_s = num_layers * touched * (1.0 - resident_fraction) * expert_bytes / pcie_bps
    compute = chunk_tokens * flops_per_token + attention_flops(context_before,
                                                               context_before + chunk_tokens)
    return max(stream_s, compute / gpu_flops)


@dataclass(frozen=True)
class PrefillCeiling:
    """A prompt's prefill bound, chunk by chunk."""

    num_tokens: int
    seconds: float
    tokens_per_s: float
    chunk_seconds: tuple[float, ...]


def prefill_ceiling(num_tokens: int, chunk_tokens: int, pcie_bps: float, gpu_flops: float,
                    resident_fraction: float = 0.0, **shape: int) -> PrefillCeiling:
    """Sum of the chunk bounds for a prompt of num_tokens in chunks of chunk_tokens."""
    if num_tokens <= 0 or chunk_tokens <= 0:
        raise ValueError("token counts must be positive")
    times = []
    for start in range(0, num_tokens, chunk_tokens):
        size = min(chunk_tokens, num_tokens - start)
        times.append(prefill_chunk_time(size, pcie_bps, gpu_flops, resident_fraction,
                                        context_before=start, **shape))
    total = sum(times)
    return PrefillCeiling(num_tokens, total, num_tokens / total, tuple(times))

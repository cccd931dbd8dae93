"""The offload backend's choice of which misses take the PCIe copies, replayed on the calibrated
routing trace at the 24 GiB plan's slot count (no tensors: a stand-in carries the rates)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.experts.ceiling import EXPERT_BYTES
from engine.experts.cpu_rate import CpuRateTracker
from engine.experts.offload import OffloadedExperts
from engine.experts.policy import ShiftLRFUPolicy
from engine.experts.profile import MachineProfile
from engine.experts.traces import synthetic_trace

PCIE, CPU = 53.9e9, 50e9  # H100 machine: measured pinned PCIe; the CPU int8 path, assumed


def _replay(trace, slots: int | list[int], balanced: bool, expert_bytes: int = EXPERT_BYTES,
            cpu_rate: float = CPU) -> tuple[float, float]:
    """(hit rate, miss seconds per token) after 64 warm-up tokens; a layer's misses take
    max(copies / PCIe, CPU experts / CPU) seconds (both rates in bytes, as the CPU's is measured
    per host format)."""
    cpu = torch.device("cpu")
    slots = [slots] * trace.shape[1] if isinstance(slots, int) else slots
    backend = SimpleNamespace(
        policy=ShiftLRFUPolicy(slots_per_layer=slots), cpu_misses=True,
        profiles={cpu: MachineProfile(PCIE, cpu_rate, 1e4, "test")} if balanced else {},
        layers=[SimpleNamespace(device=cpu, host=SimpleNamespace(expert_bytes=lambda: expert_bytes))]
        * trace.shape[1], cpu_rate=CpuRateTracker())
    backend._profile = lambda layer: OffloadedExperts._profile(backend, layer)
    backend._num_copies = lambda *a: OffloadedExperts._num_copies(backend, *a)
    if not balanced:  # the split without the policy's say: half the misses offered for copies
        backend._num_copies = lambda layer, m, b: -(-m // 2)
    hits = uses = 0
    seconds = 0.0
    for t, token in enumerate(trace.tolist()):
        for layer, experts in enumerate(token):
            selected = sorted(set(experts))
            misses = [e for e in selected if backend.policy.lookup((layer, e)) is None]
            decisions = OffloadedExperts._copy_decisions(backend, layer, misses, selected)
            copies = sum(a is not None for _, a in decisions)
            if t >= 64:
                hits += len(selected) - len(misses)
                uses += len(selected)
                seconds += max(copies / PCIE, (len(misses) - copies) / cpu_rate) * expert_bytes
    return hits / uses, seconds / (trace.shape[0] - 64)


@pytest.mark.parametrize(("slots", "hit_cost"), [(22, 0.005), (8, 0.01)])
def test_the_pcie_share_is_kept_at_a_small_cost_in_hits(slots, hit_cost):
    """Bypassed misses sent to the CPU on top of its share made it the slow path (the old
    behaviour, replayed here by offering half the misses for copies with the bypass deciding).
    Keeping the split saves a quarter to a third of the miss time per token; forcing the PCIe
    share into the cache costs little hit rate (measured, seeds 0 and 1: at 22 slots, the 24 GiB
    plan, 25.1 -> 19.1 ms and 0.573 -> 0.574, 25.8 -> 18.9 ms and 0.583 -> 0.579; at 8 slots
    45.5 -> 29.1 ms and 0.292 -> 0.287). Caching only what the policy admits and copying the
    rest uncached would keep those hits too, but needs a scratch slot the grouped kernel reads."""
    trace = synthetic_trace(320, 36, seed=0)
    old_hits, old_seconds = _replay(trace, slots, balanced=False)
    new_hits, new_seconds = _replay(trace, slots, balanced=True)
    assert new_seconds < 0.85 * old_seconds, (old_seconds, new_seconds)
    assert new_hits >= old_hits - hit_cost, (old_hits, new_hits)


@pytest.mark.parametrize("routing", ["trace", "random"])
def test_int4_experts_more_than_halve_the_miss_time_at_24_gib(routing):
    """The opt-in int4 format at the 24 GiB plan: 1,420 slots (39-40 per layer) instead of 798,
    and 0.56x the bytes per miss. Measured, seed 0: trace 19.1 -> 7.1 ms per token (hit rate
    0.574 -> 0.746), random 32.4 -> 15.9 ms (0.172 -> 0.302). The CPU's int4 rate in bytes is
    taken equal to int8's (measured on two cores here: int4 38 GB/s, int8 31 GB/s)."""
    from dataclasses import replace

    import numpy as np

    from engine.experts import int4
    from engine.placement import GpuInfo, ModelShape, plan_placement

    fp8_shape = ModelShape.for_mistral_small_4()
    int4_bytes = int4.expert_bytes(4096, 2048)
    int4_shape = replace(fp8_shape, expert_bytes=int4_bytes, host_expert_bytes=int4_bytes * 4608)
    h100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 85_520_000_000, 84_900_000_000)
    plans = [plan_placement(shape, [h100], host_available_bytes=240 * 10**9, context_length=32768,
                            gpu_budget="24GiB") for shape in (fp8_shape, int4_shape)]
    assert [p.num_expert_slots for p in plans] == [798, 1420]
    trace = synthetic_trace(320, 36, seed=0) if routing == "trace" else \
        np.random.default_rng(0).integers(0, 128, size=(320, 36, 4))
    fp8_hits, fp8_seconds = _replay(trace, list(plans[0].slots_per_layer()), True)
    int4_hits, int4_seconds = _replay(trace, list(plans[1].slots_per_layer()), True, int4_bytes)
    assert int4_seconds < 0.55 * fp8_seconds, (fp8_seconds, int4_seconds)
    assert int4_hits > fp8_hits + 0.1, (fp8_hits, int4_hits)


@pytest.mark.parametrize("cpu_rate", [0.23e9, 11.6e9], ids=["pytorch", "cpu-kernel"])
@pytest.mark.parametrize(("routing", "budget_ms"), [("trace", 10.0), ("random", 27.0)])
def test_nvfp4_misses_over_pcie_alone_stay_within_the_targets(routing, budget_ms, cpu_rate):
    """The NVFP4 release at the 24 GiB plan: int4's bytes and slots (39-40 per layer). The CPU
    computes NVFP4 at 0.23 GB/s through PyTorch (no C compiler) and 11.6 GB/s through Quire's
    kernel (both measured here at the real shapes, 2 cores): either way a step's few misses
    finish sooner over PCIe (54 GB/s: 0.26 ms per 14.2 MB expert, against 1.2 ms on the CPU),
    so the split sends them there. Measured, seed 0: trace 9.3 ms of misses per token (hit
    rate 0.755), random 26.1 ms (0.302): with ~6-8 ms of resident compute, above 40 and 25
    tok/s. (At an assumed 18 GB/s for a 16-core host the CPU takes a share: random 24.0 ms.)"""
    import numpy as np

    from engine.experts import nvfp4

    blob_bytes = 2 * 2048 * nvfp4.blob_width(4096) + 4096 * nvfp4.blob_width(2048)  # what moves
    trace = synthetic_trace(320, 36, seed=0) if routing == "trace" else \
        np.random.default_rng(0).integers(0, 128, size=(320, 36, 4))
    _, seconds = _replay(trace, 39, True, blob_bytes, cpu_rate=cpu_rate)
    _, pcie_only = _replay(trace, 39, True, blob_bytes, cpu_rate=1.0)
    assert seconds * 1e3 < budget_ms, seconds
    assert seconds == pytest.approx(pcie_only, rel=0.02)  # the CPU takes (almost) nothing

"""The CPU path's rate as decode's jobs achieve it (engine/experts/cpu_rate.py)."""

from __future__ import annotations

import time

import pytest
import torch

from engine.experts import cpu_rate
from engine.experts.cpu_rate import CpuRateTracker
from engine.experts.profile import MachineProfile

PROFILE = MachineProfile(50e9, 60e9, 1e4, "test")


def test_without_jobs_the_measured_rates_stand():
    assert CpuRateTracker().adjusted(PROFILE) == PROFILE


def test_the_moving_average_scales_both_cpu_rates_within_bounds():
    tracker = CpuRateTracker()
    tracker.observe(30 << 20, 0.001)  # ~31 GB/s: half the quiet measurement
    adjusted = tracker.adjusted(PROFILE)
    assert adjusted.cpu_expert_bytes_per_s == pytest.approx(tracker.bytes_per_s)
    assert adjusted.cpu_expert_tokens_per_s == pytest.approx(1e4 * tracker.bytes_per_s / 60e9)
    assert adjusted.pcie_bytes_per_s == PROFILE.pcie_bytes_per_s
    tracker.observe(30 << 20, 0.002)
    assert tracker.bytes_per_s == pytest.approx((30 << 20) * (1000 - cpu_rate.WEIGHT * 500))
    tracker.observe(1 << 10, 1.0)  # a hand-off, not a rate: ignored
    assert tracker.bytes_per_s == pytest.approx((30 << 20) * (1000 - cpu_rate.WEIGHT * 500))
    slow = CpuRateTracker()
    slow.observe(1 << 20, 10.0)
    assert slow.adjusted(PROFILE).cpu_expert_bytes_per_s == pytest.approx(60e9 * cpu_rate.LOWEST)


def test_a_cpu_slower_than_measured_hands_its_misses_to_the_copies(tiny_checkpoint, monkeypatch):
    """Measured quiet the CPU path looks as fast as PCIe; each decode job then takes 20 ms, and
    after a few steps the split gives nearly all misses to the copies."""
    from engine.experts import offload
    from engine.runtime import LoadedModel, LoadOptions

    monkeypatch.setattr(cpu_rate, "OBSERVE_MIN_BYTES", 0)
    forward = offload.cpu_expert_forward

    def slow_forward(*args):
        time.sleep(0.02)
        return forward(*args)

    monkeypatch.setattr(offload, "cpu_expert_forward", slow_forward)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=0))
    experts = model.experts
    expert_bytes = experts.layers[0].host.expert_bytes()
    quiet = MachineProfile(expert_bytes / 1e-3, expert_bytes / 1e-3, 1e6, "test")  # 1 ms an expert
    experts.profiles = {torch.device("cpu"): quiet}
    assert experts._num_copies(0, 8, expert_bytes) == 4  # equal rates: half each
    cache, token = model.decoder.new_cache(), 1
    for _ in range(4):
        token = int(model.forward(model.embed_ids([token]), cache).argmax())
    assert experts.counters()["cpu_experts"] > 0
    assert experts.cpu_rate.bytes_per_s < expert_bytes / 0.015  # ~20 ms an expert, not 1
    assert experts._num_copies(0, 8, expert_bytes) >= 7
    model.close()

"""The CPU path's speed as the running model sees it (engine/experts/cpu_rate.py)."""

from __future__ import annotations

import time

import pytest
import torch

from engine.experts import cpu_rate
from engine.experts.cpu_rate import CpuRateTracker, predicted_seconds
from engine.experts.profile import MachineProfile

PROFILE = MachineProfile(50e9, 60e9, 1e4, "test")


def test_without_jobs_the_measured_rates_stand():
    assert CpuRateTracker().adjusted(PROFILE) == PROFILE


def test_a_job_is_predicted_by_weights_or_tokens_whichever_is_slower():
    weights_s = (30 << 20) / 60e9
    assert predicted_seconds(PROFILE, 30 << 20, [1, 1]) == pytest.approx(2 * weights_s)
    assert predicted_seconds(PROFILE, 30 << 20, [1, 500]) == pytest.approx(weights_s + 500 / 1e4)
    assert predicted_seconds(MachineProfile(50e9, 0.0, 0.0, "none"), 30 << 20, [1]) == 0.0


def test_the_moving_average_scales_both_cpu_rates_within_bounds():
    tracker = CpuRateTracker()
    tracker.observe(0.001, 0.002)  # half the predicted speed
    adjusted = tracker.adjusted(PROFILE)
    assert adjusted.cpu_expert_bytes_per_s == pytest.approx(30e9)
    assert adjusted.cpu_expert_tokens_per_s == pytest.approx(5e3)
    assert adjusted.pcie_bytes_per_s == PROFILE.pcie_bytes_per_s
    tracker.observe(0.001, 0.001)
    assert tracker.factor == pytest.approx(0.5 + cpu_rate.WEIGHT * 0.5)
    tracker.observe(1e-5, 1.0)  # a hand-off, not a rate: ignored
    assert tracker.factor == pytest.approx(0.5 + cpu_rate.WEIGHT * 0.5)
    slow = CpuRateTracker()
    slow.observe(0.001, 10.0)
    assert slow.adjusted(PROFILE).cpu_expert_bytes_per_s == pytest.approx(60e9 * cpu_rate.LOWEST)


def test_a_cpu_slower_than_measured_hands_its_misses_to_the_copies(tiny_checkpoint, monkeypatch):
    """Measured quiet the CPU path looks as fast as PCIe (1 ms an expert); each job then takes
    20 ms more, and after a few decode steps the split gives nearly all misses to the copies;
    a short prefill chunk's streamed experts stay off the CPU likewise."""
    from engine.experts import offload
    from engine.runtime import LoadedModel, LoadOptions

    forward = offload.cpu_expert_forward

    def slow_forward(*args):
        time.sleep(0.02)
        return forward(*args)

    monkeypatch.setattr(offload, "cpu_expert_forward", slow_forward)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=0))
    experts = model.experts
    expert_bytes = experts.layers[0].host.expert_bytes()
    quiet = MachineProfile(expert_bytes / 1e-3, expert_bytes / 1e-3, 1e3, "test")
    experts.profiles = {torch.device("cpu"): quiet}
    assert experts._num_copies(0, 8, expert_bytes) == 4  # equal rates: half each
    cache, token = model.decoder.new_cache(), 1
    for _ in range(4):
        token = int(model.forward(model.embed_ids([token]), cache).argmax())
    assert experts.counters()["cpu_experts"] > 0
    assert experts.counters()["cpu_speed_seen"] < 0.1  # ~1 ms predicted, ~21 ms taken
    assert experts._num_copies(0, 8, expert_bytes) >= 7
    model.close()

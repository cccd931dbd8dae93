"""The CPU experts' thread count (engine/experts/cpu_threads.py)."""

from __future__ import annotations

import pytest
import torch

from engine.experts import cpu_threads


@pytest.fixture
def pool(monkeypatch):
    """PyTorch's pool as a recorded number, on a 16-core machine, nothing chosen yet."""
    state = {"threads": 16}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(threads=n))
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cpu_threads, "_chosen_by_user", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return state


def test_a_gpu_load_leaves_one_core_to_the_thread_driving_the_gpu(pool):
    cpu_threads.leave_one_core_to_the_gpu()
    assert pool["threads"] == 15
    cpu_threads.leave_one_core_to_the_gpu()  # a second load: still one core left, not two
    assert pool["threads"] == 15


def test_a_count_the_user_chose_is_kept(pool, monkeypatch):
    cpu_threads.choose(3)
    assert pool["threads"] == 3
    cpu_threads.choose(-1)  # every core
    assert pool["threads"] == 16
    cpu_threads.choose(16)
    cpu_threads.leave_one_core_to_the_gpu()
    assert pool["threads"] == 16
    monkeypatch.setattr(cpu_threads, "_chosen_by_user", False)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    cpu_threads.leave_one_core_to_the_gpu()
    assert pool["threads"] == 16


def test_a_two_core_machine_keeps_both(pool, monkeypatch):
    pool["threads"] = 2
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    cpu_threads.leave_one_core_to_the_gpu()
    assert pool["threads"] == 2


def test_a_cpu_load_keeps_every_core(tiny_checkpoint, monkeypatch):
    from engine.runtime import LoadedModel, LoadOptions

    calls = []
    monkeypatch.setattr(cpu_threads, "leave_one_core_to_the_gpu", lambda: calls.append(True))
    LoadedModel(tiny_checkpoint, LoadOptions(device="cpu", dtype="float32", expert_cache_slots=2)).close()
    assert calls == []

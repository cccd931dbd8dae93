"""Exactly-sized page-locked host tensors (engine/experts/pinned.py), with the CUDA runtime
replaced by a recorder on CPU machines and for real in the cuda-marked test."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from engine.experts import pinned


class FakeCudart:
    def __init__(self, error: int = 0) -> None:
        self.error, self.registered, self.unregistered = error, [], []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.registered.append((ptr, size, flags))
        return self.error

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def cudart(monkeypatch):
    """A CUDA driver that is 'there': registration recorded, PyTorch's pinned allocator refused
    (a CPU build has none), so a test sees which way a tensor was made."""
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise AssertionError("PyTorch's pinned allocator (rounds to a power of two)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return fake


def test_a_size_that_is_not_a_power_of_two_is_locked_in_place_and_unlocked_after(cudart):
    tensor = pinned.host_empty((3, 64, 36), torch.uint8, pin=True)  # 6,912 bytes
    (ptr, size, flags), = cudart.registered
    assert (ptr, size, flags) == (tensor.data_ptr(), 6912, pinned.REGISTER_PORTABLE)
    assert cudart.unregistered == []
    del tensor
    gc.collect()
    assert cudart.unregistered == [ptr]


def test_powers_of_two_and_unpinned_tensors_take_the_usual_ways(cudart, monkeypatch):
    with pytest.raises(AssertionError, match="power of two"):  # PyTorch's allocator, not ours
        pinned.host_empty((4, 256), torch.int8, pin=True)
    plain = pinned.host_empty((3, 5), torch.float32, pin=False)
    assert plain.shape == (3, 5) and cudart.registered == []


def test_a_refused_registration_falls_back_to_pytorch_with_a_warning(cudart, caplog):
    cudart.error = 2  # cudaErrorMemoryAllocation
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="power of two"):
        pinned.host_empty((3, 7), torch.uint8, pin=True)
    assert "could not page-lock 21 bytes" in caplog.text


def test_without_cuda_nothing_is_locked():
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    tensor = pinned.host_empty((3, 7), torch.uint8, pin=True)
    assert tensor.shape == (3, 7) and not tensor.is_pinned()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_registered_tensor_is_pinned_and_copies_asynchronously():
    stats_before = torch.cuda.host_memory_stats().get("reserved_bytes.current", 0)
    tensor = pinned.host_empty((1000, 1001), torch.uint8, pin=True)  # not a power of two
    assert tensor.is_pinned()
    assert torch.cuda.host_memory_stats().get("reserved_bytes.current", 0) == stats_before
    tensor.copy_(torch.arange(1000 * 1001, dtype=torch.int64).view(1000, 1001).to(torch.uint8))
    on_gpu = tensor.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), tensor)

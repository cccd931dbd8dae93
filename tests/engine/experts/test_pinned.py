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
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: fake.unregistered.append(f"synchronized {device}"))
    fake.capturing = False
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: fake.capturing)
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise AssertionError("PyTorch's pinned allocator (rounds to a power of two)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return fake


def test_a_size_that_is_not_a_power_of_two_is_locked_in_place_and_unlocked_after(cudart):
    """Whole pages of its own (a page shared with another locked range would fail to lock),
    unlocked after the copies drain, when the memory goes: not when the first tensor object
    does, as a view may outlive it."""
    tensor = pinned.host_empty((3, 64, 36), torch.uint8, pin=True)  # 6,912 bytes
    (ptr, size, flags), = cudart.registered
    assert ptr == tensor.data_ptr() and ptr % pinned.PAGE == 0 and flags == pinned.REGISTER_PORTABLE
    assert size == -(-6912 // pinned.PAGE) * pinned.PAGE
    view = tensor[1]
    del tensor
    gc.collect()
    assert cudart.unregistered == []
    del view
    gc.collect()
    assert cudart.unregistered == ["synchronized 0", "synchronized 1", ptr]  # every card's copies


def test_memory_freed_during_a_graph_capture_is_unlocked_after_it(cudart):
    """A finalizer may run inside a CUDA graph capture, where synchronising would invalidate
    the capture: the unlock waits for the next one outside."""
    first = pinned.host_empty((3, 64, 36), torch.uint8, pin=True)
    second = pinned.host_empty((5, 64, 36), torch.uint8, pin=True)
    first_ptr, second_ptr = first.data_ptr(), second.data_ptr()
    cudart.capturing = True
    del first
    gc.collect()
    assert cudart.unregistered == []
    cudart.capturing = False
    del second
    gc.collect()
    assert cudart.unregistered == ["synchronized 0", "synchronized 1", first_ptr, second_ptr]


def test_powers_of_two_and_unpinned_tensors_take_the_usual_ways(cudart, monkeypatch):
    with pytest.raises(AssertionError, match="power of two"):  # PyTorch's allocator, not ours
        pinned.host_empty((4, 256), torch.int8, pin=True)
    plain = pinned.host_empty((3, 5), torch.float32, pin=False)
    assert plain.shape == (3, 5) and cudart.registered == []


def test_a_refused_registration_clears_the_error_and_falls_back_with_a_warning(cudart, caplog,
                                                                             monkeypatch):
    """The runtime's last error is reset: PyTorch would otherwise blame the next kernel launch."""
    cleared = []
    monkeypatch.setattr(pinned, "_clear_cuda_error", lambda: cleared.append(True))
    cudart.error = 2  # cudaErrorMemoryAllocation
    with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match="power of two"):
        pinned.host_empty((3, 7), torch.uint8, pin=True)
    assert "could not page-lock 21 bytes" in caplog.text and cleared == [True]


def test_without_cuda_nothing_is_locked():
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    tensor = pinned.host_empty((3, 7), torch.uint8, pin=True)
    assert tensor.shape == (3, 7) and not pinned.is_page_locked(tensor)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_registered_tensors_are_pinned_and_small_neighbours_both_lock():
    """Two small tensors made one after the other (neighbours on the heap) both lock, PyTorch's
    pinned pool is not used, copies from them are right, and a kernel launched after them does
    not trip over a stale CUDA error."""
    stats_before = torch.cuda.host_memory_stats().get("reserved_bytes.current", 0)
    tensors = [pinned.host_empty((37, 101), torch.uint8, pin=True) for _ in range(2)]
    assert all(pinned.is_page_locked(t) for t in tensors)
    assert torch.cuda.host_memory_stats().get("reserved_bytes.current", 0) == stats_before
    for i, tensor in enumerate(tensors):
        tensor.copy_(torch.arange(37 * 101, dtype=torch.int64).view(37, 101).add(i).to(torch.uint8))
        on_gpu = tensor.to("cuda", non_blocking=True)
        assert torch.equal((on_gpu.int() + 1).cpu(), tensor.int() + 1)


class FakeRuntime:
    """cudaPointerGetAttributes answering `kind` for one address (an error for any other)."""

    def __init__(self, ptr: int, kind: int) -> None:
        self.ptr, self.kind, self.errors_cleared = ptr, kind, 0

    def cudaPointerGetAttributes(self, attributes, ptr) -> int:  # noqa: N802 - CUDA's name
        if ptr.value != self.ptr:
            return 1  # cudaErrorInvalidValue
        attributes.raw = self.kind.to_bytes(4, "little") + attributes.raw[4:]
        return 0

    def cudaGetLastError(self) -> int:  # noqa: N802
        self.errors_cleared += 1
        return 0


@pytest.mark.parametrize("kind, locked", [(1, True), (0, False)])
def test_page_locked_is_asked_of_the_driver_at_the_tensors_own_address(monkeypatch, kind, locked):
    """is_pinned() asks about the storage's start, which for an in-place lock lies before the
    locked pages: the driver is asked about the tensor's first byte instead, and a refused
    question is a no, its error cleared."""
    raw = torch.zeros(2 * pinned.PAGE, dtype=torch.uint8)
    view = raw[pinned.PAGE:]
    runtime = FakeRuntime(view.data_ptr(), kind)
    monkeypatch.setattr(pinned, "_runtime", lambda: runtime)
    assert pinned.is_page_locked(view) is locked
    assert pinned.is_page_locked(raw) is False and runtime.errors_cleared == 1
    monkeypatch.setattr(pinned, "_runtime", lambda: None)  # no CUDA runtime at all
    assert pinned.is_page_locked(view) is False

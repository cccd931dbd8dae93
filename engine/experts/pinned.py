"""Page-locked host tensors of exactly their size, for the host expert store.

PyTorch's pinned allocator rounds every request up to a power of two: a layer of int4 experts
(1.125 GiB of gate_up blobs) would pin 2 GiB, the whole int4 store as much as FP8's, and the
plan (which counts the real bytes) would be wrong by 47 GiB. Sizes that are powers of two
already (FP8 and int8 at this model's shapes) lose nothing there and keep PyTorch's allocator.
Any other size is allocated as ordinary memory and page-locked where it lies with
cudaHostRegister (as PyTorch's own checkpoint stager does), then unlocked when the memory goes.

The locked range is whole pages that belong to this allocation alone (it is over-allocated by
two pages and the tensor starts on a page boundary): the driver locks every page a range
touches, and a page shared with another registered range would make the second registration
fail ("already registered").
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import weakref

import torch

log = logging.getLogger(__name__)

REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every GPU, not only the current
PAGE = mmap.PAGESIZE


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when `pin` (and a CUDA driver is present)."""
    if not pin or not torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype)
    num_bytes = math.prod(shape) * dtype.itemsize
    if num_bytes == 0 or num_bytes & (num_bytes - 1) == 0:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    raw = torch.empty(num_bytes + 2 * PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    locked = -(-num_bytes // PAGE) * PAGE  # whole pages, inside `raw`
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(raw.data_ptr() + start, locked, REGISTER_PORTABLE))
    if error != 0:  # e.g. no more lockable memory: PyTorch's allocator may still manage
        _clear_cuda_error()
        log.warning("could not page-lock %d bytes in place (CUDA error %d): using PyTorch's pinned "
                    "allocator, which rounds the size up to a power of two", num_bytes, error)
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    tensor = raw[start : start + num_bytes].view(dtype).view(shape)
    # On the memory (the storage), not on this tensor object: views, .numpy() or .detach() may
    # outlive it. Not at exit: the process's memory goes anyway.
    release = weakref.finalize(tensor.untyped_storage(), _unregister, raw.data_ptr() + start)
    release.atexit = False
    return tensor


def _unregister(ptr: int) -> None:
    # Copies queued from this memory (prefetch, copies made ahead) must land before it is
    # unlocked and freed, on every card the layers sit on: pinned memory from PyTorch's
    # allocator gets that wait, ours does not. A finalizer can run in the middle of a CUDA graph
    # capture, where a synchronisation would invalidate it: then the unlock waits for the end.
    if torch.cuda.is_current_stream_capturing():
        _deferred.append(ptr)
        return
    for device in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device)
    for locked in (*_deferred, ptr):
        torch.cuda.cudart().cudaHostUnregister(locked)
    _deferred.clear()


_deferred: list[int] = []  # unlocks that fell inside a CUDA graph capture


def is_page_locked(tensor: torch.Tensor) -> bool:
    """Whether the CUDA driver holds `tensor`'s memory page-locked. Tensor.is_pinned() asks about
    the start of the tensor's storage, which for host_empty's locked ranges lies in the unlocked
    head before the page boundary: PyTorch 2.11 answers False there (seen on the H200 machine),
    though copies from the tensor run at pinned speed (54 GB/s against 7 for pageable memory)."""
    if tensor.is_pinned():
        return True
    runtime = _runtime()
    if runtime is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    attributes = ctypes.create_string_buffer(128)  # cudaPointerAttributes; `type` comes first
    if runtime.cudaPointerGetAttributes(attributes, ctypes.c_void_p(tensor.data_ptr())) != 0:
        runtime.cudaGetLastError()  # PyTorch would blame its next kernel launch
        return False
    return int.from_bytes(attributes.raw[:4], "little") == MEMORY_TYPE_HOST


MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked host memory


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed call: PyTorch checks it after every
    kernel launch and would blame the next one. PyTorch's bindings have no cudaGetLastError;
    the runtime library it loaded has."""
    runtime = _runtime()
    if runtime is None:
        log.warning("could not reset CUDA's last error after a failed page-lock")
    else:
        runtime.cudaGetLastError()


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library PyTorch loaded: that of torch's own CUDA major version first,
    since another one on the library path would keep a last error of its own."""
    major = (torch.version.cuda or "12").split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            runtime = ctypes.CDLL(name)
            runtime.cudaGetLastError  # noqa: B018 - the symbol must be there
            return runtime
        except (OSError, AttributeError):
            continue
    return None

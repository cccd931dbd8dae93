"""Page-locked host tensors of exactly their size, for the host expert store.

PyTorch's pinned allocator rounds every request up to a power of two: a layer of int4 experts
(1.125 GiB of gate_up blobs) would pin 2 GiB, the whole int4 store as much as FP8's, and the
plan (which counts the real bytes) would be wrong by 47 GiB. Sizes that are powers of two
already (FP8 and int8 at this model's shapes) lose nothing there and keep PyTorch's allocator;
any other size is allocated as ordinary memory and page-locked where it lies with
cudaHostRegister (as PyTorch's own checkpoint stager does), and unlocked when the tensor goes.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch

log = logging.getLogger(__name__)

REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every GPU, not only the current


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when `pin` (and a CUDA driver is present)."""
    if not pin or not torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype)
    num_bytes = math.prod(shape) * dtype.itemsize
    if num_bytes == 0 or num_bytes & (num_bytes - 1) == 0:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    tensor = torch.empty(shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(tensor.data_ptr(), num_bytes, REGISTER_PORTABLE))
    if error != 0:  # e.g. the locked-memory limit: PyTorch's allocator may still manage
        log.warning("could not page-lock %d bytes in place (CUDA error %d): using PyTorch's pinned "
                    "allocator, which rounds the size up to a power of two", num_bytes, error)
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())
    return tensor

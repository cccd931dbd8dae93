"""Expert tensors handled as bytes: every host format but bf16 is one byte per element, and the
NVFP4 blobs' dtype (float4_e2m1fn_x2) has almost no kernels of its own in PyTorch, so storage is
allocated, copied and moved between devices as uint8 and viewed as its format."""

from __future__ import annotations

import torch


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-byte-per-element expert tensor's bytes as uint8 (bf16 ones as they are), for copies:
    the NVFP4 blobs' dtype (float4_e2m1fn_x2) has few kernels of its own in PyTorch, and a
    byte copy is what every 1-byte format needs."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def empty_like_format(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised storage for experts of a host format on `device`: 1-byte formats as bytes
    viewed as their dtype (PyTorch needs nothing of float4_e2m1fn_x2 but the view)."""
    if dtype.itemsize == 1:
        return torch.empty(shape, dtype=torch.uint8, device=device).view(dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def to_device(t: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """`t` on `device`, its bytes moved (see byte_view) and viewed as its dtype again."""
    return byte_view(t).to(device, non_blocking=non_blocking).view(t.dtype)

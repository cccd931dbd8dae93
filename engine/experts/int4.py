"""The int4 host format (opt-in): each expert matrix requantised once at load to 4-bit codes with
a bf16 scale and offset per group of GROUP inputs, stored as one byte blob per matrix so that
the codes and their scales travel together (to a slot, a staging buffer, the CPU kernel).

Why: 14.2 MB per expert instead of 25.2 MB in FP8 (0.5625x), so a GPU budget holds 1.8x the
slots and every miss moves 0.56x the bytes over PCIe and through the CPU. It is lossy (about
Q4_1 at group 64), so it is never chosen automatically.

Blob of an [N, K] matrix: uint8 [N, K/2 + 4K/GROUP] (the width encodes K for a fixed GROUP):
  - codes, the first N*K/2 bytes: [N/64, K, 32] bytes; byte (b, k, j) holds code (n=64b+j, k) in
    its low nibble and (n=64b+32+j, k) in its high nibble. This is the layout PyTorch's CPU int4
    kernel (`_weight_int4pack_mm_for_cpu`) reads, so the CPU serves misses from RAM as it is, and
    it suits a GPU kernel (K-major, 32 contiguous bytes per k: coalesced loads).
  - scales, the remaining bytes, as bf16 [K/GROUP, N, 2] = (scale, offset) per group and row.
value(n, k) = (code - 8) * scale + offset, code in 0..15. Dequantising forms this in fp32.
Glossary: N output rows, K inputs, G groups per row (K / GROUP).
"""

from __future__ import annotations

import functools
import logging

import torch

from engine.errors import InputError

log = logging.getLogger(__name__)

GROUP = 64  # inputs per (scale, offset): 4.5 bits per weight in all
ROW_BLOCK = 64  # rows per block of the code layout (two nibbles of 32 rows each)
MAX_CODE = 15


def blob_width(k: int) -> int:
    """Bytes per row of an [N, K] matrix's blob."""
    return k // 2 + 4 * k // GROUP


def expert_bytes(hidden: int, width: int) -> int:
    """Bytes of one expert's blobs: gate_up [2I, H] and down [H, I]."""
    return 2 * width * blob_width(hidden) + hidden * blob_width(width)


def matrix_shape(blob: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the matrix a blob [N, width] (or a stack [..., N, width]) holds."""
    n, width = blob.shape[-2:]
    k = width * 2 * GROUP // (GROUP + 8)
    if blob_width(k) != width:
        raise ValueError(f"{width} bytes per row is not an int4 blob width (group {GROUP})")
    return n, k


def supports(n: int, k: int) -> bool:
    """Whether an [N, K] matrix fits the layout."""
    return n % ROW_BLOCK == 0 and k % GROUP == 0


def supports_expert(hidden: int, width: int) -> bool:
    """Whether an expert's gate_up [2I, H] and down [H, I] both fit the layout."""
    return supports(2 * width, hidden) and supports(hidden, width)


def check_shape(n: int, k: int) -> None:
    if not supports(n, k):
        raise InputError(f"4-bit experts (host format int4) need matrices whose rows are a multiple "
                         f"of {ROW_BLOCK} and inputs a multiple of {GROUP}; this model has {n}x{k}. "
                         "Choose 8-bit experts (host format auto, fp8 or int8).")


def split(blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one matrix's blob: codes uint8 [N, K/2] (the CPU kernel's layout, see the module
    docstring) and scales bf16 [K/GROUP, N, 2]. No copy."""
    n, k = matrix_shape(blob)
    flat = blob.reshape(-1)
    codes = flat[: n * k // 2].view(n, k // 2)
    scales = flat[n * k // 2:].view(torch.bfloat16).view(k // GROUP, n, 2)
    return codes, scales


def quantize(weights: torch.Tensor, multiplier: float = 1.0, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """[N, K] (any float dtype; FP8 as shipped) x multiplier -> blob uint8 [N, blob_width(K)], on
    the weights' device (a GPU quantises an expert in microseconds), or into `out`.

    Per group, min-max: scale = (max - min) / 15 and offset = min + 8 * scale, both rounded to
    bf16, and the codes chosen against the rounded values (what dequantising will use). The
    multiplier only scales (scale, offset): codes do not depend on it, which saves a pass.
    """
    n, k = weights.shape
    check_shape(n, k)
    groups = weights.reshape(n, k // GROUP, GROUP).to(torch.float32)
    low, high = torch.aminmax(groups, dim=2)  # [N, G]
    step = (high - low) / MAX_CODE
    scale = (step * multiplier).to(torch.bfloat16)
    offset = ((low + 8 * step) * multiplier).to(torch.bfloat16)
    # Codes against the rounded values, in the weights' own units: (w - offset) / scale + 8.
    per_scale = 1.0 / scale.float().clamp(min=1e-30)  # a constant group has scale 0: codes 8
    inv, bias = per_scale * multiplier, 8 - offset.float() * per_scale
    codes = torch.addcmul(bias[..., None], groups, inv[..., None]).round_().clamp_(0, MAX_CODE)
    # Written in place when `out` can take it (same device, contiguous), else copied over.
    here = out is not None and out.device == weights.device and out.is_contiguous()
    blob = out if here else torch.empty((n, blob_width(k)), dtype=torch.uint8, device=weights.device)
    codes_view, scales_view = split(blob)
    codes_view.copy_(pack_codes(codes.reshape(n, k).to(torch.uint8)))
    scales_view.copy_(torch.stack([scale, offset], dim=-1).transpose(0, 1))  # [G, N, 2]
    if out is None or here:
        return blob
    return out.copy_(blob, non_blocking=blob.is_cuda)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> the packed layout, returned as [N, K/2]."""
    n, k = codes.shape
    blocks = codes.reshape(n // ROW_BLOCK, 2, ROW_BLOCK // 2, k).transpose(2, 3)  # [N/64, 2, K, 32]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).reshape(n, k // 2)


def unpack_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The packed layout [N, K/2] -> uint8 codes [N, K]; inverse of pack_codes."""
    blocks = packed.reshape(n // ROW_BLOCK, k, ROW_BLOCK // 2)
    halves = torch.stack([blocks & 0xF, blocks >> 4], dim=1)  # [N/64, 2, K, 32]
    return halves.transpose(2, 3).reshape(n, k)


def dequantize(blob: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A blob back to the [N, K] matrix in `dtype`, formed in fp32 and rounded once."""
    n, k = matrix_shape(blob)
    packed, scales = split(blob)
    codes = unpack_codes(packed, n, k).reshape(n, k // GROUP, GROUP).to(torch.float32)
    scale, offset = (scales[..., i].transpose(0, 1).float()[..., None] for i in (0, 1))  # [N, G, 1]
    return ((codes - 8) * scale + offset).reshape(n, k).to(dtype)


def cpu_matmul(x: torch.Tensor, blob: torch.Tensor) -> torch.Tensor:
    """x [t, K] @ matrix^T -> [t, N] on the CPU: PyTorch's int4 kernel straight from the blob
    where this PyTorch has it with the layout we write, else by dequantising (slow, exact)."""
    if cpu_kernel_matches():
        packed, scales = split(blob)
        # The kernel takes scales in x's dtype: free for bf16 (the engine's dtype on GPUs).
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales.to(x.dtype))
    return x @ dequantize(blob, x.dtype).t()


@functools.cache
def cpu_kernel_matches() -> bool:
    """Whether PyTorch's CPU int4 kernel exists and packs codes exactly as pack_codes does (its
    layout is PyTorch's internal business and could change in a release)."""
    op_names = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    if not all(hasattr(torch.ops.aten, name) for name in op_names):
        log.warning("this PyTorch has no CPU int4 kernel: int4 experts on the CPU are dequantised")
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2 * ROW_BLOCK, 2 * GROUP), generator=gen, dtype=torch.int32)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    if theirs.shape != (codes.shape[0], codes.shape[1] // 2) or \
            not torch.equal(theirs.view(torch.uint8), pack_codes(codes.to(torch.uint8))):
        log.warning("PyTorch's CPU int4 kernel packs differently: int4 experts on the CPU are "
                    "dequantised (correct, slower)")
        return False
    return True

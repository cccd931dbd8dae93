"""The NVFP4 host format: the experts of Mistral's NVFP4 release, held exactly as shipped.

The release (mistralai/Mistral-Small-4-119B-2603-NVFP4, compressed-tensors
`nvfp4-pack-quantized`, group 16) stores each expert matrix [N, K] as three tensors:
  - `weight_packed` uint8 [N, K/2]: two E2M1 codes per byte, the LOW nibble is the even column;
  - `weight_scale` F8_E4M3 [N, K/16]: one scale per 16 inputs;
  - `weight_global_scale` F32 [1]: a DIVISOR of every scale of the matrix.
  value(n, k) = e2m1(code) * (e4m3(scale[n, k // 16]) / global_scale)
(compressed-tensors' own reading: `unpack_fp4_from_uint8` takes the low nibble first and
`_dequantize` divides the scale by the global scale). `input_global_scale` is the recipe's
activation scale for W4A4 serving; Quire feeds experts bf16 activations and never reads it.

Held here as one byte blob per matrix so that codes and scales travel together (to a slot, a
staging buffer): [N, K/2 + K/16] bytes, row n = its K/2 code bytes as shipped, then its K/16
scale bytes. The global divisor goes beside it as a per-row fp32 scale [N] (the fused gate_up
matrix takes w1's rows and w3's, each with its own divisor), where int8 keeps its row scales.
14.2 MB (13.5 MiB) per expert at the real shapes, 0.56x FP8 (as the int4 format). The blob tensor's dtype is PyTorch's
float4_e2m1fn_x2 (a byte holding two FP4 values), which tells it from the int4 format's uint8
blobs of the same width; arithmetic always reads it through a uint8 view.
Glossary: N output rows, K inputs.
"""

from __future__ import annotations

import functools

import torch

from engine.quant import FP8_DTYPE

GROUP = 16  # inputs per E4M3 scale
BLOB_DTYPE = torch.float4_e2m1fn_x2
E4M3_MAX, E2M1_MAX = 448.0, 6.0
# E2M1: bit 3 the sign, bits 0-2 index these magnitudes.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between neighbouring magnitudes: rounding to nearest picks the bucket.
_E2M1_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def blob_width(k: int) -> int:
    """Bytes per row of an [N, K] matrix's blob."""
    return k // 2 + k // GROUP


def expert_bytes(hidden: int, width: int) -> int:
    """Bytes of one expert: blobs of gate_up [2I, H] and down [H, I] plus their row divisors."""
    return 2 * width * (blob_width(hidden) + 4) + hidden * (blob_width(width) + 4)


def matrix_shape(blob: torch.Tensor) -> tuple[int, int]:
    """(N, K) of the matrix a blob [N, width] (or a stack [..., N, width]) holds."""
    n, width = blob.shape[-2:]
    k = width * 2 * GROUP // (GROUP + 2)
    if blob_width(k) != width or k % GROUP:
        raise ValueError(f"{width} bytes per row is not an NVFP4 blob width")
    return n, k


def is_blob(t: torch.Tensor) -> bool:
    return t.dtype == BLOB_DTYPE


def pack(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """Write one matrix's shipped tensors (`weight_packed` [N, K/2] uint8, `weight_scale`
    [N, K/16] E4M3) into its blob rows `out` [N, K/2 + K/16] (any 1-byte dtype)."""
    half = packed.shape[-1]
    raw = out.view(torch.uint8)
    raw[:, :half].copy_(packed.view(torch.uint8))
    raw[:, half:].copy_(scales.view(torch.uint8))


def codes_and_scales(blob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blob's (packed codes uint8 [N, K/2], scales E4M3 [N, K/16]) views."""
    n, k = matrix_shape(blob)
    raw = blob.view(torch.uint8)
    return raw[..., : k // 2], raw[..., k // 2:].view(FP8_DTYPE)


def dequantize(blob: torch.Tensor, divisors: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """blob [N, W] with per-row global divisors [N] -> [N, K] in `dtype`: e2m1 x (e4m3 / divisor)
    formed in fp32 and rounded once (the reference the kernels must equal in bf16)."""
    packed, scales = codes_and_scales(blob)
    return dequantize_shipped(packed, scales, divisors, dtype)


def dequantize_shipped(packed: torch.Tensor, scales: torch.Tensor, divisors: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The shipped tensors (`weight_packed` [N, K/2], `weight_scale` [N, K/16], the global
    scale as one value or per row) -> [N, K] in `dtype`, as `dequantize`."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    # One gather of both nibbles' values per byte (low nibble first): half the temporaries
    # and time of unpacking the codes first (CPU misses and tests run this).
    values = torch.index_select(_byte_values(packed.device), 0, packed.view(torch.uint8).reshape(-1).int())
    div = divisors.to(device=packed.device, dtype=torch.float32).reshape(-1, 1)  # [N or 1, 1]
    step = scales.view(FP8_DTYPE).to(torch.float32) / div
    return values.view(n, k // GROUP, GROUP).mul_(step[..., None]).reshape(n, k).to(dtype)


@functools.cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the E2M1 values of a byte's low and high nibble."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.stack([values.repeat(16), values.repeat_interleave(16)], dim=1).to(device)


def quantize(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An [N, K] matrix -> (`weight_packed`, `weight_scale`, `weight_global_scale` [1]) the way
    the release's recipe lays them out: the global scale maps the matrix's largest |w| to the
    top of E4M3 x E2M1, each group's scale maps its largest |w| to 6. For tiny test checkpoints
    and synthetic benchmarks; Quire never requantises a shipped model to NVFP4."""
    w = weights.to(torch.float32)
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"NVFP4 needs inputs in groups of {GROUP}; this matrix has {k}")
    global_scale = (E4M3_MAX * E2M1_MAX / w.abs().amax().clamp(min=1e-30)).reshape(1)
    groups = w.view(n, k // GROUP, GROUP)
    block = groups.abs().amax(dim=-1) / E2M1_MAX * global_scale  # [N, K/16]
    scales = block.clamp(max=E4M3_MAX).to(FP8_DTYPE)
    step = scales.to(torch.float32) / global_scale
    ratio = torch.where(step[..., None] > 0, groups / step[..., None], torch.zeros_like(groups))
    edges = torch.tensor(_E2M1_EDGES, dtype=torch.float32)
    codes = torch.bucketize(ratio.abs(), edges).to(torch.uint8) | ((ratio < 0).to(torch.uint8) << 3)
    codes = codes.reshape(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), scales, global_scale.to(torch.float32)

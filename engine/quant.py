"""Weight formats: FP8 E4M3 with per-tensor / per-expert scales (as shipped)."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """FP8 weight x scale multiplier (`weight_scale_inv` is a multiplier despite its name).

    The product is formed in fp32 and rounded once to `dtype`, exactly as the reference recipe.
    A `[E,1,1]` scale broadcasts over a fused expert tensor `[E, out, in]`.
    """
    if weight.dtype != FP8_DTYPE:
        return weight.to(dtype)
    if scale is None:
        raise ValueError("an FP8 weight needs its scale")
    return (weight.to(torch.float32) * scale.to(device=weight.device, dtype=torch.float32)).to(dtype)

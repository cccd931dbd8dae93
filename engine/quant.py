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
    s = scale.to(device=weight.device, dtype=torch.float32)
    if weight.dim() == 3 and s.dim() in (0, 3):
        # One expert at a time, the same arithmetic: a layer's fused experts at the real shapes
        # would need 17 GB of fp32 temporaries at once (the transformers baseline loads them).
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        for e in range(weight.shape[0]):
            scale_e = s if s.dim() == 0 else s[e if s.shape[0] > 1 else 0]
            out[e] = (weight[e].to(torch.float32) * scale_e).to(dtype)
        return out
    return (weight.to(torch.float32) * s).to(dtype)

"""YaRN rotary embedding in the interleaved pair layout, and Llama-4 query scaling.

Glossary: T tokens, N heads, R rope dims.
"""

from __future__ import annotations

import math

import torch

from engine.model.config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [R/2] with YaRN's ramp between interpolation and extrapolation."""
    dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if factor <= 1.0:
        return extrapolation
    interpolation = 1.0 / (factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        original = cfg.rope_original_max_position
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def attention_factor(cfg: ModelConfig) -> float:
    """Magnitude scale of cos/sin (1.0 when mscale == mscale_all_dim, as in Mistral Small 4)."""
    def mscale(scale: float, m: float) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return mscale(cfg.rope_factor, cfg.rope_mscale) / mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return mscale(cfg.rope_factor, 1.0)


class Rope:
    """cos/sin tables for given positions, in the model dtype (as the reference rounds them)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = yarn_inv_freq(cfg).to(device)
        self.scale = attention_factor(cfg)
        self.beta = cfg.llama_4_scaling_beta
        self.original = cfg.rope_original_max_position

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)  # [T, R/2]
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)

    def query_scale(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Llama-4 attention scaling per query position: 1 + beta * ln(1 + floor(pos / 8192))."""
        pos = positions.to(torch.float32)
        return (1 + self.beta * torch.log(1 + torch.floor(pos / self.original))).to(dtype)  # [T]


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0,x1),(x2,x3)...; output is [rotated evens | rotated odds] like the reference.

    x: [T, ..., R]; cos/sin: [T, R/2] (broadcast over the middle dims).
    """
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

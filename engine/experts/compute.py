"""Expert compute: one routed expert's SiLU-gated MLP from FP8 (or bf16) weights.

The eager path dequantises in fp32 and rounds once to the compute dtype, exactly as the
reference recipe, so offloaded and resident experts give identical results.
Glossary: t tokens for this expert, H hidden, I expert width.
"""

from __future__ import annotations

import torch

from engine.model.moe import expert_mlp
from engine.quant import FP8_DTYPE


def dequant_expert(gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
                   down_scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) in `dtype` on the weights' device."""
    def deq(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.to(device=w.device, dtype=torch.float32)
        if w.dtype == torch.int8:  # per-row scales [R]
            return (w.to(torch.float32) * s[:, None]).to(dtype)
        if w.dtype != FP8_DTYPE:
            return w.to(dtype)
        return (w.to(torch.float32) * s).to(dtype)

    return deq(gate_up, gate_up_scale), deq(down, down_scale)


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [t, H] -> [t, H]."""
    return expert_mlp(x.to(gate_up.dtype), gate_up, down)


def cpu_expert_forward(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                       down: torch.Tensor, down_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert on the CPU straight from the host format: int8 through PyTorch's int8 weight
    kernel (no dequantised copy), FP8 by eager dequantisation. x [t, H] -> [t, H]."""
    if gate_up.dtype == torch.int8:
        x = x.to(dtype)
        gu = torch.ops.aten._weight_int8pack_mm(x, gate_up, gate_up_scale.to(dtype))  # [t, 2I]
        gate, up = gu.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        return torch.ops.aten._weight_int8pack_mm(h.contiguous(), down, down_scale.to(dtype))
    return expert_forward(x, *dequant_expert(gate_up, gate_up_scale, down, down_scale, dtype))

"""All routed experts resident on their layer's device, dequantized once (small models, CPU tests)."""

from __future__ import annotations

import torch

from engine.checkpoint import Checkpoint
from engine.model.moe import ExpertBackend, run_experts
from engine.model.names import layer_prefix
from engine.quant import dequantize


def load_fused_experts(ckpt: Checkpoint, layer: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, H], down [E, H, I]) of one layer, dequantized with the [E,1,1] scales."""
    p = f"{layer_prefix(layer)}.mlp.experts"
    out = []
    for name in ("gate_up_proj", "down_proj"):
        scale_name = f"{p}.{name}_scale_inv"
        scale = ckpt.get(scale_name) if scale_name in ckpt.tensors else None
        out.append(dequantize(ckpt.get(f"{p}.{name}"), scale, dtype))
    return out[0], out[1]


class ResidentExperts(ExpertBackend):
    """Expert backend holding every expert of every layer on the layer's device."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, layer_devices: list[torch.device]) -> None:
        self.weights = []
        for layer, device in enumerate(layer_devices):
            gate_up, down = load_fused_experts(ckpt, layer, dtype)
            self.weights.append((gate_up.to(device), down.to(device)))
        self.routing_log: list[torch.Tensor] | None = None
        self.num_uses = 0  # every use is a hit: nothing is offloaded

    def forward(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                top_weights: torch.Tensor) -> torch.Tensor:
        if self.routing_log is not None:
            self.routing_log.append(top_idx.detach().cpu())
        self.num_uses += top_idx.numel()
        gate_up, down = self.weights[layer]
        return run_experts(x, top_idx, top_weights, lambda e: (gate_up[e], down[e]))

    def counters(self) -> dict[str, float]:
        return {"hits": self.num_uses, "misses": 0, "hit_rate": 1.0, "bytes_copied": 0,
                "bytes_cpu": 0, "cpu_experts": 0}

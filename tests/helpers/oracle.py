"""The numerical reference: transformers' Mistral3ForConditionalGeneration built by the
oracle recipe of checkpoint-format.md §8.4 (weights dequantized here, loaded as a state dict)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def dequantized_state_dict(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for name in f.keys():
                raw[name] = f.get_tensor(name)
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(("activation_scale", "scale_inv")):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale = raw[name + "_scale_inv"] if name.endswith("proj") else raw[
                name.removesuffix(".weight") + ".weight_scale_inv"]
            tensor = tensor.to(torch.float32) * scale.to(torch.float32)
        sd[name] = tensor.to(dtype)
    return sd


def reference_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, Mistral3ForConditionalGeneration

    config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    sd = dequantized_state_dict(model_dir, dtype)
    model = Mistral3ForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=sd, dtype=dtype
    )
    return model.eval()

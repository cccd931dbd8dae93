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


# Mistral's native names (the NVFP4 release) -> transformers' (legacy Mistral 3 layout), spelled
# here a second time, apart from engine.checkpoint_native, after transformers' own conversion
# table for Mistral's native format (conversion_mapping.py, "mistral_large4").
_NATIVE_RENAMES = [
    (r"^tok_embeddings\.", "language_model.model.embed_tokens."),
    (r"^norm\.", "language_model.model.norm."),
    (r"^output\.", "language_model.lm_head."),
    (r"^layers\.(\d+)\.attention_norm\.", r"language_model.model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"language_model.model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attention\.q_a_norm\.", r"language_model.model.layers.\1.self_attn.q_a_layernorm."),
    (r"^layers\.(\d+)\.attention\.kv_a_norm\.", r"language_model.model.layers.\1.self_attn.kv_a_layernorm."),
    (r"^layers\.(\d+)\.attention\.wq_a\.", r"language_model.model.layers.\1.self_attn.q_a_proj."),
    (r"^layers\.(\d+)\.attention\.wq_b\.", r"language_model.model.layers.\1.self_attn.q_b_proj."),
    (r"^layers\.(\d+)\.attention\.wkv_a_with_mqa\.",
     r"language_model.model.layers.\1.self_attn.kv_a_proj_with_mqa."),
    (r"^layers\.(\d+)\.attention\.wkv_b\.", r"language_model.model.layers.\1.self_attn.kv_b_proj."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"language_model.model.layers.\1.self_attn.o_proj."),
    (r"^layers\.(\d+)\.gate\.", r"language_model.model.layers.\1.mlp.gate."),
    (r"^layers\.(\d+)\.shared_experts\.w1$", r"language_model.model.layers.\1.mlp.shared_experts.gate_proj.weight"),
    (r"^layers\.(\d+)\.shared_experts\.w2$", r"language_model.model.layers.\1.mlp.shared_experts.down_proj.weight"),
    (r"^layers\.(\d+)\.shared_experts\.w3$", r"language_model.model.layers.\1.mlp.shared_experts.up_proj.weight"),
    (r"^vision_encoder\.", "vision_tower."),
    (r"^pre_mm_projector_norm\.", "multi_modal_projector.norm."),
    (r"^patch_merger\.", "multi_modal_projector.patch_merger."),
    (r"^vision_language_adapter\.w_in\.", "multi_modal_projector.linear_1."),
    (r"^vision_language_adapter\.w_out\.", "multi_modal_projector.linear_2."),
    (r"\.feed_forward\.w1\.", ".feed_forward.gate_proj."),
    (r"\.feed_forward\.w2\.", ".feed_forward.down_proj."),
    (r"\.feed_forward\.w3\.", ".feed_forward.up_proj."),
    (r"\.attention\.wv\.", ".attention.v_proj."),
    (r"\.attention\.wo\.", ".attention.o_proj."),
    (r"\.attention\.wq\.", ".attention.q_proj."),
    (r"\.attention\.wk\.", ".attention.k_proj."),
]
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _nvfp4_value(raw: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """compressed-tensors' reading: low nibble first, block scale over the global scale."""
    packed = raw[f"{prefix}.weight_packed"]
    codes = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.long)
    codes[:, 0::2], codes[:, 1::2] = (packed & 15).long(), (packed >> 4).long()
    block = raw[f"{prefix}.weight_scale"].float() / raw[f"{prefix}.weight_global_scale"].float()
    return torch.tensor(_E2M1)[codes] * block.repeat_interleave(16, dim=1)


def native_state_dict(model_dir: Path, vision_heads: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import re

    from transformers.core_model_loading import PermuteForRope

    index = json.loads((model_dir / "consolidated.safetensors.index.json").read_text())
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            raw |= {name: f.get_tensor(name) for name in f.keys()}
    values = {n: t.float() for n, t in raw.items()
              if t.dtype == torch.bfloat16 and not n.endswith("input_global_scale")}
    matrices = {n.removesuffix(".weight_packed") for n in raw if n.endswith(".weight_packed")}
    values |= {p: _nvfp4_value(raw, p) for p in matrices}
    sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, value in values.items():
        routed = re.match(r"^layers\.(\d+)\.experts\.(\d+)\.(w[123])$", name)
        if routed:
            experts.setdefault((int(routed[1]), routed[3]), {})[int(routed[2])] = value
            continue
        if re.search(r"attention\.w[qk]\.weight$", name) and name.startswith("vision_encoder."):
            value = PermuteForRope()._permute_for_rope(value, type("C", (), {"num_attention_heads": vision_heads}))
        for pattern, target in _NATIVE_RENAMES:
            name = re.sub(pattern, target, name)
        sd[name] = value.to(dtype)
    def stacked(layer: int, w: str) -> torch.Tensor:
        return torch.stack([experts[(layer, w)][e] for e in sorted(experts[(layer, w)])])

    for layer in sorted({key[0] for key in experts}):
        p = f"language_model.model.layers.{layer}.mlp.experts"
        sd[f"{p}.gate_up_proj"] = torch.cat([stacked(layer, "w1"), stacked(layer, "w3")], dim=1).to(dtype)
        sd[f"{p}.down_proj"] = stacked(layer, "w2").to(dtype)
    return sd


def native_reference_model(model_dir: Path, shape, dtype: torch.dtype = torch.float32):
    """transformers' model of a native NVFP4 folder written by engine.tiny_native for `shape`;
    its config is engine.tiny's config.json for the same shape (the HF release's form)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from engine.tiny import model_config

    raw = model_config(shape)
    del raw["quantization_config"]
    sd = native_state_dict(model_dir, shape.vision_heads, dtype)
    model = Mistral3ForConditionalGeneration.from_pretrained(
        None, config=Mistral3Config.from_dict(raw), state_dict=sd, dtype=dtype)
    return model.eval()

"""Every tensor the checkpoint must hold: name -> (safetensors dtype, shape), from the config.

The one place where checkpoint names are spelled (legacy LLaVA layout, fused experts).
"""

from __future__ import annotations

from engine.model.config import ModelConfig

TEXT = "language_model.model"
FP8 = "F8_E4M3"
BF16 = "BF16"
Spec = tuple[str, tuple[int, ...]]


def layer_prefix(layer: int) -> str:
    return f"{TEXT}.layers.{layer}"


def attention_linears(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """MLA projections: attribute name -> (out_features, in_features)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    return {
        "q_a_proj": (cfg.q_lora_rank, h),
        "q_b_proj": (nh * cfg.qk_head_dim, cfg.q_lora_rank),
        "kv_a_proj_with_mqa": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        "kv_b_proj": (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "o_proj": (h, nh * cfg.v_head_dim),
    }


def shared_linears(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    i = cfg.moe_intermediate_size * cfg.n_shared_experts
    h = cfg.hidden_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def _fp8_linear(name: str, shape: tuple[int, int], fp8: bool) -> dict[str, Spec]:
    if not fp8:
        return {f"{name}.weight": (BF16, shape)}
    return {
        f"{name}.weight": (FP8, shape),
        f"{name}.weight_scale_inv": (BF16, ()),
        f"{name}.activation_scale": (BF16, ()),
    }


def layer_specs(cfg: ModelConfig, layer: int) -> dict[str, Spec]:
    p = layer_prefix(layer)
    h, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    specs: dict[str, Spec] = {
        f"{p}.input_layernorm.weight": (BF16, (h,)),
        f"{p}.post_attention_layernorm.weight": (BF16, (h,)),
        f"{p}.self_attn.q_a_layernorm.weight": (BF16, (cfg.q_lora_rank,)),
        f"{p}.self_attn.kv_a_layernorm.weight": (BF16, (cfg.kv_lora_rank,)),
        f"{p}.mlp.gate.weight": (BF16, (e, h)),
    }
    for name, shape in attention_linears(cfg).items():
        specs |= _fp8_linear(f"{p}.self_attn.{name}", shape, cfg.is_fp8)
    for name, shape in shared_linears(cfg).items():
        specs |= _fp8_linear(f"{p}.mlp.shared_experts.{name}", shape, cfg.is_fp8)
    ex = f"{p}.mlp.experts"
    for name, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
        specs[f"{ex}.{name}"] = (FP8 if cfg.is_fp8 else BF16, shape)
        if cfg.is_fp8:
            specs[f"{ex}.{name}_scale_inv"] = (BF16, (e, 1, 1))
            specs[f"{ex}.{name}_activation_scale"] = (BF16, (e,))
    return specs


def vision_specs(cfg: ModelConfig) -> dict[str, Spec]:
    v = cfg.vision
    vh, vi = int(v["hidden_size"]), int(v["intermediate_size"])
    ps, ch = int(v.get("patch_size", 14)), int(v.get("num_channels", 3))
    m = cfg.spatial_merge_size
    specs: dict[str, Spec] = {
        "vision_tower.patch_conv.weight": (BF16, (vh, ch, ps, ps)),
        "vision_tower.ln_pre.weight": (BF16, (vh,)),
        "multi_modal_projector.norm.weight": (BF16, (vh,)),
        "multi_modal_projector.patch_merger.merging_layer.weight": (BF16, (vh, vh * m * m)),
        "multi_modal_projector.linear_1.weight": (BF16, (cfg.hidden_size, vh)),
        "multi_modal_projector.linear_2.weight": (BF16, (cfg.hidden_size, cfg.hidden_size)),
    }
    for layer in range(int(v["num_hidden_layers"])):
        p = f"vision_tower.transformer.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[f"{p}.attention.{proj}.weight"] = (BF16, (vh, vh))
        specs[f"{p}.attention_norm.weight"] = (BF16, (vh,))
        specs[f"{p}.ffn_norm.weight"] = (BF16, (vh,))
        specs[f"{p}.feed_forward.gate_proj.weight"] = (BF16, (vi, vh))
        specs[f"{p}.feed_forward.up_proj.weight"] = (BF16, (vi, vh))
        specs[f"{p}.feed_forward.down_proj.weight"] = (BF16, (vh, vi))
    return specs


def expected_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    h = cfg.hidden_size
    specs: dict[str, Spec] = {f"{TEXT}.embed_tokens.weight": (BF16, (cfg.vocab_size, h))}
    for layer in range(cfg.num_hidden_layers):
        specs |= layer_specs(cfg, layer)
    specs[f"{TEXT}.norm.weight"] = (BF16, (h,))
    specs["language_model.lm_head.weight"] = (BF16, (cfg.vocab_size, h))
    if cfg.vision:
        specs |= vision_specs(cfg)
    return specs

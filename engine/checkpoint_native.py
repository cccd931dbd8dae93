"""Mistral's native folder layout (the NVFP4 release), read under the engine's own names.

mistralai/Mistral-Small-4-119B-2603-NVFP4 ships `params.json` (no config.json),
`consolidated-0000x-of-0000y.safetensors` with `consolidated.safetensors.index.json`, and
`tekken.json`. Its tensors carry Mistral's names (`layers.3.attention.wq_a.weight`,
`layers.3.experts.17.w1.weight_packed`, ...); attention, router, norms, embeddings, head and
vision tower are BF16, the routed and shared experts NVFP4 (engine.experts.nvfp4).

This module is the one place those names are spelled. It turns params.json into the HF config
the rest of the engine reads, checks every tensor against it, and presents the folder as a
Checkpoint whose `tensors` use the engine's (HF) names: BF16 tensors renamed, the shared experts
and the vision tower's rotary projections derived when read (dequantised, or permuted to the
rotate-half order Pixtral's HF code expects, as transformers' own conversion does), the fused
routed experts derived too (all-resident and baseline paths); the host store reads the routed
experts' NVFP4 bytes as shipped, from `Checkpoint.native`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import Checkpoint, TensorInfo, index_tensors
from engine.errors import CheckpointError
from engine.experts import nvfp4
from engine.model.config import ModelConfig
from engine.model.names import TEXT, layer_prefix

PARAMS_FILE = "params.json"
INDEX_FILE = "consolidated.safetensors.index.json"
SINGLE_FILE = "consolidated.safetensors"
NVFP4_PARTS = ("weight_packed", "weight_scale", "weight_global_scale")
OPTIONAL_PART = "input_global_scale"  # W4A4 activation scale: Quire never reads it
# Native attention names -> HF; the experts' w1/w3/w2 are gate/up/down.
ATTENTION = {"wq_a": "q_a_proj", "wq_b": "q_b_proj", "wkv_a_with_mqa": "kv_a_proj_with_mqa",
             "wkv_b": "kv_b_proj", "wo": "o_proj"}
MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
Spec = tuple[tuple[str, ...], tuple[int, ...]]  # allowed dtypes, shape


def open_native(folder: Path) -> Checkpoint:
    """Validate a native folder and present it under the engine's names. Raises CheckpointError."""
    params = _read_params(folder)
    raw = hf_config(params, str(folder / PARAMS_FILE))
    config = replace(ModelConfig.from_hf(raw, where=str(folder / PARAMS_FILE)), expert_format="nvfp4")
    stored = index_tensors(folder, INDEX_FILE, SINGLE_FILE)
    quantization = params.get("quantization")
    fp8 = isinstance(quantization, dict) and "fp8" in str(quantization.get("qformat_weight", ""))
    if fp8 or any(".qscale_" in name for name in stored):  # Mistral's native copy of the FP8 release
        raise CheckpointError(
            f"{folder} is Mistral's native copy of the FP8 release (params.json with FP8 "
            "tensors); Quire reads that release in its Hugging Face form. Choose the folder "
            "with config.json and model-0000x-of-0000y.safetensors, or the NVFP4 release.")
    _check_tensors(folder, native_specs(config, stored), stored)
    tensors, derived = engine_view(config, stored)
    ckpt = Checkpoint(folder, config, raw, tensors, derived, native=stored)
    for name, make in list(derived.items()):  # bind the readers to this checkpoint
        derived[name] = partial(make, ckpt)
    return ckpt


def _read_params(folder: Path) -> dict[str, Any]:
    try:
        params = json.loads((folder / PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{PARAMS_FILE} in {folder} cannot be read ({exc}). Copy it again "
                              "from the original model download.") from exc
    if not isinstance(params, dict):
        raise CheckpointError(f"{PARAMS_FILE} in {folder} is not a JSON object; copy it again.")
    return params


def hf_config(params: dict[str, Any], where: str) -> dict[str, Any]:
    """params.json -> the config.json of the same model in HF form (Mistral3ForConditionalGeneration)."""
    try:
        moe, yarn, l4 = params["moe"], params["yarn"], params.get("llama_4_scaling") or {}
        unsupported = [what for what, bad in (
            ("no Llama-4 query scaling (llama_4_scaling)", not l4),
            ("dense layers (moe.first_k_dense_replace)", moe.get("first_k_dense_replace", 0) != 0),
            ("MoE every n layers (moe.route_every_n)", moe.get("route_every_n", 1) != 1),
            ("tied embeddings", params.get("tied_embeddings", False)),
            ("no latent attention (kv_lora_rank)", not params.get("kv_lora_rank")),
            ("YaRN magnitude scaling (yarn.apply_scale)", yarn.get("apply_scale", False)),
            ("a query scaling window other than YaRN's (llama_4_scaling)",
             l4.get("original_max_position_embeddings", yarn["original_max_position_embeddings"])
             != yarn["original_max_position_embeddings"]),
        ) if bad]
        if unsupported:
            raise CheckpointError(f"{where} describes a model with {unsupported[0]}, which is not "
                                  "Mistral Small 4. Choose the folder of "
                                  "mistralai/Mistral-Small-4-119B-2603-NVFP4.")
        head_dim = int(params["qk_nope_head_dim"]) + int(params["qk_rope_head_dim"])
        text = {
            "model_type": "mistral4", "vocab_size": int(params["vocab_size"]),
            "hidden_size": int(params["dim"]), "intermediate_size": int(params.get("hidden_dim", 0)),
            "moe_intermediate_size": int(moe["expert_hidden_dim"]),
            "num_hidden_layers": int(params["n_layers"]), "num_attention_heads": int(params["n_heads"]),
            "num_key_value_heads": int(params.get("n_kv_heads", params["n_heads"])),
            "head_dim": head_dim, "qk_head_dim": head_dim,
            "q_lora_rank": int(params["q_lora_rank"]), "kv_lora_rank": int(params["kv_lora_rank"]),
            "qk_nope_head_dim": int(params["qk_nope_head_dim"]),
            "qk_rope_head_dim": int(params["qk_rope_head_dim"]), "v_head_dim": int(params["v_head_dim"]),
            "n_routed_experts": int(moe["num_experts"]), "num_experts_per_tok": int(moe["num_experts_per_tok"]),
            "n_shared_experts": int(moe.get("num_shared_experts", 1)),
            "routed_scaling_factor": float(moe.get("routed_scale", 1.0)),
            "n_group": int(moe.get("num_expert_groups", 1)),
            "topk_group": int(moe.get("num_expert_groups_per_tok", 1)), "norm_topk_prob": True,
            "first_k_dense_replace": 0, "hidden_act": "silu", "rms_norm_eps": float(params["norm_eps"]),
            "max_position_embeddings": int(params.get("max_position_embeddings", 1048576)),
            "rope_interleave": True, "attention_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
            # YaRN as the FP8 release's config.json states it for the same model (mscale and
            # mscale_all_dim 1.0), so both releases compute the same attention: params.json's
            # `apply_scale: false` means no magnitude scale on cos/sin, which is also what
            # mscale == mscale_all_dim gives.
            "rope_parameters": {
                "type": "yarn", "rope_type": "yarn", "rope_theta": float(params.get("rope_theta", 10000.0)),
                "factor": float(yarn["factor"]),
                "original_max_position_embeddings": int(yarn["original_max_position_embeddings"]),
                "beta_fast": float(yarn.get("beta", 32.0)), "beta_slow": float(yarn.get("alpha", 1.0)),
                "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": float(l4["beta"]),
            },
        }
        return _with_vision({"architectures": ["Mistral3ForConditionalGeneration"],
                             "model_type": "mistral3", "dtype": "bfloat16", "text_config": text,
                             "tie_word_embeddings": False, "projector_hidden_act": "gelu",
                             "vision_feature_layer": -1, "multimodal_projector_bias": False},
                            params.get("vision_encoder"), where)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: not an object
        raise CheckpointError(f"{where} is missing or has an invalid value for {exc}; the file looks "
                              "damaged. Copy params.json again from the original model download.") from exc


def _with_vision(raw: dict[str, Any], vision: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if not vision:
        return raw
    if vision.get("adapter_bias"):
        raise CheckpointError(f"{where} describes a vision adapter with biases, which Mistral "
                              "Small 4 does not have. Choose the folder of the NVFP4 release.")
    hidden, heads = int(vision["hidden_size"]), int(vision["num_attention_heads"])
    raw["vision_config"] = {
        "model_type": "pixtral", "hidden_size": hidden, "intermediate_size": int(vision["intermediate_size"]),
        "num_hidden_layers": int(vision["num_hidden_layers"]), "num_attention_heads": heads,
        "head_dim": hidden // heads, "num_channels": int(vision.get("num_channels", 3)),
        "image_size": int(vision.get("image_size", vision.get("max_image_size", 1540))),
        "patch_size": int(vision["patch_size"]), "hidden_act": "silu", "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "axial", "rope_theta": float(vision.get("rope_theta", 10000.0))},
    }
    raw["image_token_index"] = int(vision.get("image_token_id", 10))
    raw["spatial_merge_size"] = int(vision.get("spatial_merge_size", 2))
    return raw


def _nvfp4(name: str, out_f: int, in_f: int) -> dict[str, Spec]:
    if in_f % nvfp4.GROUP:
        raise CheckpointError(f"{name} has {in_f} inputs, not a multiple of NVFP4's group of {nvfp4.GROUP}")
    return {f"{name}.weight_packed": (("U8",), (out_f, in_f // 2)),
            f"{name}.weight_scale": (("F8_E4M3",), (out_f, in_f // nvfp4.GROUP)),
            f"{name}.weight_global_scale": (("F32", "BF16", "F16"), (1,))}


def _bf16(shape: tuple[int, ...]) -> Spec:
    return ("BF16",), shape


def native_specs(cfg: ModelConfig, stored: dict[str, TensorInfo] | None = None) -> dict[str, Spec]:
    """Every tensor a native NVFP4 folder must hold (an optional input_global_scale aside). The
    shared experts are NVFP4 in the release, BF16 (`.weight`) accepted where `stored` has them."""
    h, nh, i = cfg.hidden_size, cfg.num_attention_heads, cfg.moe_intermediate_size
    specs = {"tok_embeddings.weight": _bf16((cfg.vocab_size, h)), "norm.weight": _bf16((h,)),
             "output.weight": _bf16((cfg.vocab_size, h))}
    shapes = {"wq_a": (cfg.q_lora_rank, h), "wq_b": (nh * cfg.qk_head_dim, cfg.q_lora_rank),
              "wkv_a_with_mqa": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
              "wkv_b": (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
              "wo": (h, nh * cfg.v_head_dim)}
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}"
        specs |= {f"{p}.attention_norm.weight": _bf16((h,)), f"{p}.ffn_norm.weight": _bf16((h,)),
                  f"{p}.attention.q_a_norm.weight": _bf16((cfg.q_lora_rank,)),
                  f"{p}.attention.kv_a_norm.weight": _bf16((cfg.kv_lora_rank,)),
                  f"{p}.gate.weight": _bf16((cfg.n_routed_experts, h))}
        specs |= {f"{p}.attention.{n}.weight": _bf16(s) for n, s in shapes.items()}
        shared = i * cfg.n_shared_experts
        for expert in [f"{p}.shared_experts"] + [f"{p}.experts.{e}" for e in range(cfg.n_routed_experts)]:
            width = shared if expert.endswith("shared_experts") else i
            if expert.endswith("shared_experts") and f"{expert}.w1.weight" in (stored or {}):
                specs |= {f"{expert}.{w}.weight": _bf16((h, width) if w == "w2" else (width, h))
                          for w in MLP}
                continue
            specs |= _nvfp4(f"{expert}.w1", width, h) | _nvfp4(f"{expert}.w3", width, h) \
                | _nvfp4(f"{expert}.w2", h, width)
    return specs | (_vision_specs(cfg) if cfg.vision else {})


def _vision_specs(cfg: ModelConfig) -> dict[str, Spec]:
    v = cfg.vision
    vh, vi, m = int(v["hidden_size"]), int(v["intermediate_size"]), cfg.spatial_merge_size
    ps, ch = int(v["patch_size"]), int(v["num_channels"])
    specs = {"vision_encoder.patch_conv.weight": _bf16((vh, ch, ps, ps)),
             "vision_encoder.ln_pre.weight": _bf16((vh,)), "pre_mm_projector_norm.weight": _bf16((vh,)),
             "patch_merger.merging_layer.weight": _bf16((vh, vh * m * m)),
             "vision_language_adapter.w_in.weight": _bf16((cfg.hidden_size, vh)),
             "vision_language_adapter.w_out.weight": _bf16((cfg.hidden_size, cfg.hidden_size))}
    for layer in range(int(v["num_hidden_layers"])):
        p = f"vision_encoder.transformer.layers.{layer}"
        specs |= {f"{p}.attention.{w}.weight": _bf16((vh, vh)) for w in ("wq", "wk", "wv", "wo")}
        specs |= {f"{p}.attention_norm.weight": _bf16((vh,)), f"{p}.ffn_norm.weight": _bf16((vh,)),
                  f"{p}.feed_forward.w1.weight": _bf16((vi, vh)),
                  f"{p}.feed_forward.w3.weight": _bf16((vi, vh)),
                  f"{p}.feed_forward.w2.weight": _bf16((vh, vi))}
    return specs


def _check_tensors(folder: Path, specs: dict[str, Spec], stored: dict[str, TensorInfo]) -> None:
    absent = [n for n in specs if n not in stored]
    if absent:
        raise CheckpointError(
            f"{folder} lacks {len(absent)} tensor(s) that params.json calls for, e.g. {absent[0]}; "
            "the download is incomplete or params.json belongs to another model.")
    unused = [n for n in stored if n not in specs and not n.endswith(OPTIONAL_PART)]
    if unused:
        raise CheckpointError(
            f"{folder} holds {len(unused)} tensor(s) that Quire's reading of params.json does not "
            f"describe, e.g. {unused[0]}: a variant of the NVFP4 release that Quire does not "
            "know. Use the release as Mistral ships it, or the FP8 release's config.json folder.")
    for name, (dtypes, shape) in specs.items():
        info = stored[name]
        shape_ok = info.shape == shape or (shape == (1,) and info.shape == ())
        if info.dtype not in dtypes or not shape_ok:
            raise CheckpointError(
                f"{name} is {info.dtype}{list(info.shape)} but params.json implies {dtypes[0]}"
                f"{list(shape)}: params.json does not match the weights. Copy the folder again.")


def engine_view(cfg: ModelConfig, stored: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], dict]:
    """(tensors under the engine's names, derived readers taking the Checkpoint)."""
    tensors: dict[str, TensorInfo] = {}
    derived: dict[str, Any] = {}

    def rename(hf: str, native: str) -> None:
        tensors[hf] = stored[native]

    def derive(hf: str, shape: tuple[int, ...], make) -> None:
        # Listed as the engine holds it (bf16 bytes, for planning); read in fp32, so that each
        # caller rounds once to its own dtype.
        tensors[hf] = TensorInfo(hf, None, "BF16", shape, 2 * math.prod(shape), 0)
        derived[hf] = make

    rename(f"{TEXT}.embed_tokens.weight", "tok_embeddings.weight")
    rename(f"{TEXT}.norm.weight", "norm.weight")
    rename("language_model.lm_head.weight", "output.weight")
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    for layer in range(cfg.num_hidden_layers):
        p, n = layer_prefix(layer), f"layers.{layer}"
        rename(f"{p}.input_layernorm.weight", f"{n}.attention_norm.weight")
        rename(f"{p}.post_attention_layernorm.weight", f"{n}.ffn_norm.weight")
        rename(f"{p}.self_attn.q_a_layernorm.weight", f"{n}.attention.q_a_norm.weight")
        rename(f"{p}.self_attn.kv_a_layernorm.weight", f"{n}.attention.kv_a_norm.weight")
        rename(f"{p}.mlp.gate.weight", f"{n}.gate.weight")
        for native, hf in ATTENTION.items():
            rename(f"{p}.self_attn.{hf}.weight", f"{n}.attention.{native}.weight")
        shared = i * cfg.n_shared_experts
        for native, hf in MLP.items():
            shape = (h, shared) if native == "w2" else (shared, h)
            if f"{n}.shared_experts.{native}.weight" in stored:  # BF16, as a variant may ship
                rename(f"{p}.mlp.shared_experts.{hf}.weight", f"{n}.shared_experts.{native}.weight")
                continue
            derive(f"{p}.mlp.shared_experts.{hf}.weight", shape,
                   partial(_dequantized, prefix=f"{n}.shared_experts.{native}"))
        derive(f"{p}.mlp.experts.gate_up_proj", (e, 2 * i, h), partial(_fused, layer=layer, gate_up=True))
        derive(f"{p}.mlp.experts.down_proj", (e, h, i), partial(_fused, layer=layer, gate_up=False))
    if cfg.vision:
        _vision_view(cfg, stored, rename, derive)
    return tensors, derived


def _vision_view(cfg: ModelConfig, stored: dict[str, TensorInfo], rename, derive) -> None:
    rename("vision_tower.patch_conv.weight", "vision_encoder.patch_conv.weight")
    rename("vision_tower.ln_pre.weight", "vision_encoder.ln_pre.weight")
    rename("multi_modal_projector.norm.weight", "pre_mm_projector_norm.weight")
    rename("multi_modal_projector.patch_merger.merging_layer.weight", "patch_merger.merging_layer.weight")
    rename("multi_modal_projector.linear_1.weight", "vision_language_adapter.w_in.weight")
    rename("multi_modal_projector.linear_2.weight", "vision_language_adapter.w_out.weight")
    heads = int(cfg.vision["num_attention_heads"])
    for layer in range(int(cfg.vision["num_hidden_layers"])):
        hf, n = f"vision_tower.transformer.layers.{layer}", f"vision_encoder.transformer.layers.{layer}"
        for part in ("attention_norm", "ffn_norm"):
            rename(f"{hf}.{part}.weight", f"{n}.{part}.weight")
        rename(f"{hf}.attention.v_proj.weight", f"{n}.attention.wv.weight")
        rename(f"{hf}.attention.o_proj.weight", f"{n}.attention.wo.weight")
        for native, proj in MLP.items():
            rename(f"{hf}.feed_forward.{proj}.weight", f"{n}.feed_forward.{native}.weight")
        for native, proj in (("wq", "q_proj"), ("wk", "k_proj")):
            name = f"{n}.attention.{native}.weight"
            derive(f"{hf}.attention.{proj}.weight", stored[name].shape,
                   partial(_rotate_half_order, name=name, heads=heads))


def _dequantized(ckpt: Checkpoint, prefix: str) -> torch.Tensor:
    """One NVFP4 matrix of the folder in fp32."""
    parts = [ckpt.get(f"{prefix}.{part}") for part in NVFP4_PARTS]
    return nvfp4.dequantize_shipped(*parts)


def _fused(ckpt: Checkpoint, layer: int, gate_up: bool) -> torch.Tensor:
    """A layer's routed experts stacked as the HF layout fuses them, in fp32: gate_up [E, 2I, H]
    (w1's rows, then w3's) or down [E, H, I]."""
    p = f"layers.{layer}.experts"
    names = ("w1", "w3") if gate_up else ("w2",)
    return torch.stack([torch.cat([_dequantized(ckpt, f"{p}.{e}.{w}") for w in names])
                        for e in range(ckpt.config.n_routed_experts)])


def _rotate_half_order(ckpt: Checkpoint, name: str, heads: int) -> torch.Tensor:
    """A vision q/k projection stored for interleaved RoPE pairs, rows reordered per head to the
    rotate-half pairs (first half, second half) of transformers' Pixtral."""
    w = ckpt.get(name)
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

"""Writes a tiny random-weight checkpoint in the layout of Mistral's NVFP4 release
(engine.checkpoint_native): params.json, consolidated shards with Mistral's names, NVFP4
routed and shared experts, BF16 everything else, tekken.json as the only tokenizer file.

The weights are engine.tiny's for the same shape, so the two folders hold the same model up to
the NVFP4 rounding of the experts (and BF16 instead of FP8 elsewhere).

    python -m engine.tiny_native OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from engine.tiny import PREFIX, TinyShape, all_tensors, write_shards
from engine.tiny_tokenizer import tekken_v15

ATTENTION = {"q_a_proj": "wq_a", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a_with_mqa",
             "kv_b_proj": "wkv_b", "o_proj": "wo"}
MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def params(s: TinyShape) -> dict:
    return {
        "dim": s.hidden, "n_layers": s.layers, "head_dim": s.qk_nope_head_dim + s.qk_rope_head_dim,
        "hidden_dim": 3 * s.hidden, "n_heads": s.heads, "n_kv_heads": s.heads, "norm_eps": 1e-06,
        "q_lora_rank": s.q_lora_rank, "kv_lora_rank": s.kv_lora_rank,
        "qk_nope_head_dim": s.qk_nope_head_dim, "qk_rope_head_dim": s.qk_rope_head_dim,
        "v_head_dim": s.v_head_dim, "rope_theta": 10000.0, "vocab_size": s.vocab,
        "tied_embeddings": False, "max_position_embeddings": 1048576,
        "yarn": {"factor": 128.0, "original_max_position_embeddings": 8192, "beta": 32.0,
                 "alpha": 1.0, "apply_scale": False},
        "llama_4_scaling": {"original_max_position_embeddings": 8192, "beta": 0.1},
        "moe": {"num_experts": s.experts, "num_experts_per_tok": s.top_k,
                "expert_hidden_dim": s.moe_intermediate, "num_shared_experts": 1,
                "first_k_dense_replace": 0, "num_expert_groups": s.groups,
                "num_expert_groups_per_tok": s.topk_group, "route_every_n": 1, "routed_scale": 1.0,
                "expert_parallel": 1, "expert_model_parallel": 1},
        "vision_encoder": {
            "hidden_size": s.vision_hidden, "num_channels": 3, "max_image_size": 1540,
            "patch_size": 14, "rope_theta": 10000.0, "intermediate_size": s.vision_intermediate,
            "num_hidden_layers": s.vision_layers, "num_attention_heads": s.vision_heads,
            "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13,
            "adapter_bias": False, "spatial_merge_size": 2, "add_pre_mm_projector_layer_norm": True,
            "mm_projector_id": "patch_merge"},
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
                "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                      "group_size": 16, "dynamic": "local"}}},
            "ignore": ["re:.*attention.*", "re:.*gate$", "output", "re:vision.*", "re:patch_merger.*"]},
    }


def native_tensors(s: TinyShape) -> dict:
    """engine.tiny's tensors for the shape, dequantised, renamed and requantised as the release."""
    import torch

    from engine.experts import nvfp4

    hf = all_tensors(s, with_experts=not s.fast_experts)  # random-byte experts are made below
    nat: dict = {}

    def value(name: str):
        w = hf[name]
        scale = hf.get(f"{name}_scale_inv") if name.endswith("proj") else \
            hf.get(name.removesuffix(".weight") + ".weight_scale_inv")
        return w.float() * scale.float() if scale is not None else w.float()

    def put_nvfp4(name: str, w, act_dtype) -> None:
        packed, scales, global_scale = nvfp4.quantize(w)
        nat.update({f"{name}.weight_packed": packed, f"{name}.weight_scale": scales,
                    f"{name}.weight_global_scale": global_scale,
                    f"{name}.input_global_scale": torch.tensor([100.0], dtype=act_dtype)})

    nat["tok_embeddings.weight"] = hf[f"{PREFIX}.embed_tokens.weight"]
    nat["norm.weight"] = hf[f"{PREFIX}.norm.weight"]
    nat["output.weight"] = hf["language_model.lm_head.weight"]
    for layer in range(s.layers):
        p, n = f"{PREFIX}.layers.{layer}", f"layers.{layer}"
        nat[f"{n}.attention_norm.weight"] = hf[f"{p}.input_layernorm.weight"]
        nat[f"{n}.ffn_norm.weight"] = hf[f"{p}.post_attention_layernorm.weight"]
        nat[f"{n}.attention.q_a_norm.weight"] = hf[f"{p}.self_attn.q_a_layernorm.weight"]
        nat[f"{n}.attention.kv_a_norm.weight"] = hf[f"{p}.self_attn.kv_a_layernorm.weight"]
        nat[f"{n}.gate.weight"] = hf[f"{p}.mlp.gate.weight"]
        for proj, native in ATTENTION.items():
            nat[f"{n}.attention.{native}.weight"] = value(f"{p}.self_attn.{proj}.weight").to(torch.bfloat16)
        for proj, native in MLP.items():
            put_nvfp4(f"{n}.shared_experts.{native}", value(f"{p}.mlp.shared_experts.{proj}.weight"),
                      torch.bfloat16)
        if s.fast_experts:  # benchmarks at real shapes: random bytes, not a quantisation
            nat |= _random_nvfp4_experts(s, n, gen=torch.Generator().manual_seed(s.seed + layer))
            continue
        gate_up, down = value(f"{p}.mlp.experts.gate_up_proj"), value(f"{p}.mlp.experts.down_proj")
        for e in range(s.experts):
            put_nvfp4(f"{n}.experts.{e}.w1", gate_up[e, : s.moe_intermediate], torch.float32)
            put_nvfp4(f"{n}.experts.{e}.w3", gate_up[e, s.moe_intermediate:], torch.float32)
            put_nvfp4(f"{n}.experts.{e}.w2", down[e], torch.float32)
    return nat | _native_vision(hf, s)


def _random_nvfp4_experts(s: TinyShape, prefix: str, gen) -> dict:
    """Random NVFP4 experts (every code; E4M3 scales 0.5-0.94, global divisors that keep
    activations O(1)): for speed benchmarks, where values do not matter."""
    import torch

    from engine.experts import nvfp4

    t = {}
    for e in range(s.experts):
        for w, (rows, cols) in (("w1", (s.moe_intermediate, s.hidden)), ("w3", (s.moe_intermediate, s.hidden)),
                                ("w2", (s.hidden, s.moe_intermediate))):
            name = f"{prefix}.experts.{e}.{w}"
            scales = 0x30 | torch.randint(0, 8, (rows, cols // nvfp4.GROUP), dtype=torch.uint8, generator=gen)
            t |= {f"{name}.weight_packed": torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8,
                                                         generator=gen),
                  f"{name}.weight_scale": scales.view(torch.float8_e4m3fn),
                  f"{name}.weight_global_scale": torch.tensor([3.0 * cols**0.5]),
                  f"{name}.input_global_scale": torch.tensor([100.0])}
    return t


def _native_vision(hf: dict, s: TinyShape) -> dict:
    nat = {"vision_encoder.patch_conv.weight": hf["vision_tower.patch_conv.weight"],
           "vision_encoder.ln_pre.weight": hf["vision_tower.ln_pre.weight"],
           "pre_mm_projector_norm.weight": hf["multi_modal_projector.norm.weight"],
           "patch_merger.merging_layer.weight": hf["multi_modal_projector.patch_merger.merging_layer.weight"],
           "vision_language_adapter.w_in.weight": hf["multi_modal_projector.linear_1.weight"],
           "vision_language_adapter.w_out.weight": hf["multi_modal_projector.linear_2.weight"]}
    for layer in range(s.vision_layers):
        p, n = f"vision_tower.transformer.layers.{layer}", f"vision_encoder.transformer.layers.{layer}"
        for part in ("attention_norm", "ffn_norm"):
            nat[f"{n}.{part}.weight"] = hf[f"{p}.{part}.weight"]
        nat[f"{n}.attention.wv.weight"] = hf[f"{p}.attention.v_proj.weight"]
        nat[f"{n}.attention.wo.weight"] = hf[f"{p}.attention.o_proj.weight"]
        for proj, native in MLP.items():
            nat[f"{n}.feed_forward.{native}.weight"] = hf[f"{p}.feed_forward.{proj}.weight"]
        for proj, native in (("q_proj", "wq"), ("k_proj", "wk")):
            w = hf[f"{p}.attention.{proj}.weight"]  # rotate-half rows -> interleaved pairs
            rows, cols = w.shape
            half = rows // s.vision_heads // 2
            nat[f"{n}.attention.{native}.weight"] = \
                w.view(s.vision_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols).contiguous()
    return nat


def write_tiny_nvfp4_checkpoint(out: Path, shape: TinyShape | None = None, *,
                                tokenizer_from: Path | None = None) -> Path:
    """Write the folder `out` (created if needed) and return it. `tokenizer_from`: a folder whose
    tekken.json to copy (building one takes a second)."""
    shape = shape or TinyShape()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params(shape), indent=2))
    write_shards(native_tensors(shape), out, shape.shards, "consolidated")
    if tokenizer_from is not None:
        shutil.copyfile(Path(tokenizer_from) / "tekken.json", out / "tekken.json")
    else:
        (out / "tekken.json").write_text(json.dumps(tekken_v15()), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m engine.tiny_native OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new folder", file=sys.stderr)
        return 2
    write_tiny_nvfp4_checkpoint(out)
    print(f"wrote a tiny NVFP4 checkpoint to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

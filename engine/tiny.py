"""Writes a tiny random-weight Mistral Small 4 checkpoint in exactly the real folder layout.

Used by the tests and by the app's demo. Names, dtypes, ranks, FP8 scale shapes, shard index,
tokenizer files and chat template all follow the real checkpoint (see
shared/reference/checkpoint-format.md); only the sizes shrink.

    python -m engine.tiny OUT_DIR [--layers N --experts E --top-k K --groups G --hidden H ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.tiny_tokenizer import write_tokenizer_files

FP8_MAX = 448.0
PREFIX = "language_model.model"


@dataclass(frozen=True)
class TinyShape:
    """The sizes a tiny checkpoint shrinks to (defaults: fast on 2 CPU cores)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    experts: int = 8
    top_k: int = 2
    groups: int = 1
    topk_group: int = 1
    moe_intermediate: int = 32
    vocab: int = 131072  # the real tokenizer's vocabulary, so real prompts work
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    shards: int = 2
    seed: int = 0
    fast_experts: int = 0  # 1: experts as random FP8 bytes (benchmarks at real shapes; seconds, not minutes)


def text_config(s: TinyShape) -> dict:
    head_dim = s.qk_nope_head_dim + s.qk_rope_head_dim
    return {
        "model_type": "mistral4", "vocab_size": s.vocab, "hidden_size": s.hidden,
        "intermediate_size": 3 * s.hidden, "moe_intermediate_size": s.moe_intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.heads, "head_dim": head_dim, "qk_head_dim": head_dim,
        "q_lora_rank": s.q_lora_rank, "kv_lora_rank": s.kv_lora_rank,
        "qk_nope_head_dim": s.qk_nope_head_dim, "qk_rope_head_dim": s.qk_rope_head_dim,
        "v_head_dim": s.v_head_dim, "n_routed_experts": s.experts,
        "num_experts_per_tok": s.top_k, "n_shared_experts": 1, "routed_scaling_factor": 1.0,
        "n_group": s.groups, "topk_group": s.topk_group, "norm_topk_prob": True,
        "first_k_dense_replace": 0, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "max_position_embeddings": 1048576, "rope_interleave": True, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
        "pretraining_tp": 1, "output_router_logits": False,
        "rope_parameters": {
            "type": "yarn", "rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
            "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
    }


def model_config(s: TinyShape) -> dict:
    return {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "dtype": "bfloat16", "transformers_version": "5.23.0",
        "image_token_index": 10, "projector_hidden_act": "gelu",
        "multimodal_projector_bias": False, "spatial_merge_size": 2, "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
            "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        },
        "text_config": text_config(s),
        "vision_config": {
            "model_type": "pixtral", "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_intermediate, "num_hidden_layers": s.vision_layers,
            "num_attention_heads": s.vision_heads, "head_dim": s.vision_hidden // s.vision_heads,
            "num_channels": 3, "image_size": 1540, "patch_size": 14, "hidden_act": "silu",
            "attention_dropout": 0.0, "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
    }


def _fp8_quantize(weight, scale_dims: tuple[int, ...] = ()):
    """Per-tensor (or per-expert, `scale_dims=(E,1,1)`) FP8 E4M3: returns (fp8, bf16 multiplier)."""
    import torch

    num_leading = 1 if scale_dims else 0
    amax = weight.abs().amax(dim=tuple(range(num_leading, weight.dim())), keepdim=True)
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
    fp8 = (weight.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return fp8, scale.reshape(scale_dims)


def _linear_tensors(name: str, out_f: int, in_f: int, rand: Callable) -> dict:
    import torch

    fp8, scale = _fp8_quantize(rand(out_f, in_f, std=in_f**-0.5))
    act = torch.tensor(0.02, dtype=torch.bfloat16)
    return {f"{name}.weight": fp8, f"{name}.weight_scale_inv": scale, f"{name}.activation_scale": act}


def _norm(n: int, rand: Callable):
    import torch

    return (1.0 + rand(n, std=0.1)).to(torch.bfloat16)


def layer_tensors(s: TinyShape, layer: int, rand: Callable, with_experts: bool = True) -> dict:
    import torch

    p = f"{PREFIX}.layers.{layer}"
    qk = s.qk_nope_head_dim + s.qk_rope_head_dim
    t: dict = {
        f"{p}.input_layernorm.weight": _norm(s.hidden, rand),
        f"{p}.post_attention_layernorm.weight": _norm(s.hidden, rand),
        f"{p}.self_attn.q_a_layernorm.weight": _norm(s.q_lora_rank, rand),
        f"{p}.self_attn.kv_a_layernorm.weight": _norm(s.kv_lora_rank, rand),
        f"{p}.mlp.gate.weight": rand(s.experts, s.hidden, std=s.hidden**-0.5).to(torch.bfloat16),
    }
    a = f"{p}.self_attn"
    t |= _linear_tensors(f"{a}.q_a_proj", s.q_lora_rank, s.hidden, rand)
    t |= _linear_tensors(f"{a}.q_b_proj", s.heads * qk, s.q_lora_rank, rand)
    t |= _linear_tensors(f"{a}.kv_a_proj_with_mqa", s.kv_lora_rank + s.qk_rope_head_dim, s.hidden, rand)
    t |= _linear_tensors(f"{a}.kv_b_proj", s.heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank, rand)
    t |= _linear_tensors(f"{a}.o_proj", s.hidden, s.heads * s.v_head_dim, rand)
    m = f"{p}.mlp.shared_experts"
    t |= _linear_tensors(f"{m}.gate_proj", s.moe_intermediate, s.hidden, rand)
    t |= _linear_tensors(f"{m}.up_proj", s.moe_intermediate, s.hidden, rand)
    t |= _linear_tensors(f"{m}.down_proj", s.hidden, s.moe_intermediate, rand)
    e = f"{p}.mlp.experts"
    if not with_experts:
        return t
    if s.fast_experts:
        return t | _random_byte_experts(s, e, rand.generator)
    gate_up = rand(s.experts, 2 * s.moe_intermediate, s.hidden, std=s.hidden**-0.5)
    # Each expert gets its own magnitude so that the [E,1,1] scales genuinely differ.
    gate_up = gate_up * (0.5 + torch.rand(s.experts, 1, 1, generator=rand.generator))
    down = rand(s.experts, s.hidden, s.moe_intermediate, std=s.moe_intermediate**-0.5)
    for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
        fp8, scale = _fp8_quantize(w, (s.experts, 1, 1))
        t[f"{e}.{name}"] = fp8
        t[f"{e}.{name}_scale_inv"] = scale
        t[f"{e}.{name}_activation_scale"] = torch.full((s.experts,), 0.02, dtype=torch.bfloat16)
    return t


def _random_byte_experts(s: TinyShape, prefix: str, gen) -> dict:
    """FP8 experts from random bytes with the top exponent bit cleared (|w| <= 1.875, no NaN),
    scaled so activations stay O(1): for speed benchmarks, where values do not matter."""
    import torch

    t = {}
    for name, shape, fan_in in (("gate_up_proj", (s.experts, 2 * s.moe_intermediate, s.hidden), s.hidden),
                                ("down_proj", (s.experts, s.hidden, s.moe_intermediate), s.moe_intermediate)):
        raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen) & 0xBF
        t[f"{prefix}.{name}"] = raw.view(torch.float8_e4m3fn)
        t[f"{prefix}.{name}_scale_inv"] = torch.full((s.experts, 1, 1), fan_in**-0.5, dtype=torch.bfloat16)
        t[f"{prefix}.{name}_activation_scale"] = torch.full((s.experts,), 0.02, dtype=torch.bfloat16)
    return t


def vision_tensors(s: TinyShape, rand: Callable) -> dict:
    import torch

    def lin(o: int, i: int):
        return rand(o, i, std=i**-0.5).to(torch.bfloat16)

    vh, vi = s.vision_hidden, s.vision_intermediate
    t = {
        "vision_tower.patch_conv.weight": rand(vh, 3, 14, 14, std=0.05).to(torch.bfloat16),
        "vision_tower.ln_pre.weight": _norm(vh, rand),
        "multi_modal_projector.norm.weight": _norm(vh, rand),
        "multi_modal_projector.patch_merger.merging_layer.weight": lin(vh, 4 * vh),
        "multi_modal_projector.linear_1.weight": lin(s.hidden, vh),
        "multi_modal_projector.linear_2.weight": lin(s.hidden, s.hidden),
    }
    for v in range(s.vision_layers):
        p = f"vision_tower.transformer.layers.{v}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.attention.{proj}.weight"] = lin(vh, vh)
        t[f"{p}.attention_norm.weight"] = _norm(vh, rand)
        t[f"{p}.ffn_norm.weight"] = _norm(vh, rand)
        t[f"{p}.feed_forward.gate_proj.weight"] = lin(vi, vh)
        t[f"{p}.feed_forward.up_proj.weight"] = lin(vi, vh)
        t[f"{p}.feed_forward.down_proj.weight"] = lin(vh, vi)
    return t


def all_tensors(s: TinyShape, with_experts: bool = True) -> dict:
    """Every tensor of the checkpoint (`with_experts` False: all but the routed experts, for a
    writer that makes its own)."""
    import torch

    gen = torch.Generator().manual_seed(s.seed)

    def rand(*shape: int, std: float = 1.0):
        return torch.randn(*shape, generator=gen) * std

    rand.generator = gen  # type: ignore[attr-defined]
    t = {f"{PREFIX}.embed_tokens.weight": rand(s.vocab, s.hidden).to(torch.bfloat16)}
    for layer in range(s.layers):
        t |= layer_tensors(s, layer, rand, with_experts)
    t[f"{PREFIX}.norm.weight"] = _norm(s.hidden, rand)
    t["language_model.lm_head.weight"] = rand(s.vocab, s.hidden, std=s.hidden**-0.5).to(torch.bfloat16)
    t |= vision_tensors(s, rand)
    return t


def write_shards(tensors: dict, out: Path, num_shards: int, stem: str = "model") -> None:
    """Split tensors (in order) into `num_shards` files plus their index: `stem` "model" writes
    the HF names (model-00001-of-00002.safetensors), "consolidated" Mistral's native ones."""
    from safetensors.torch import save_file

    names = list(tensors)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    per_shard = math.ceil(total_size / num_shards)
    groups: list[list[str]] = [[]]
    acc = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and acc + nbytes > per_shard and len(groups) < num_shards:
            groups.append([])
            acc = 0
        groups[-1].append(name)
        acc += nbytes
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        fname = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in group}
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": total_size,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(
    out: Path, shape: TinyShape | None = None, *, tokenizer_from: Path | None = None
) -> Path:
    """Write the checkpoint folder `out` (created if needed) and return it.

    `tokenizer_from` copies tokenizer files from an existing folder (they do not depend on
    the shape and take a few seconds to build).
    """
    shape = shape or TinyShape()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model_config(shape), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
                    "max_length": 1048576, "transformers_version": "5.23.0"}, indent=2)
    )
    (out / "processor_config.json").write_text(json.dumps(processor_config(), indent=2))
    (out / "SYSTEM_PROMPT.txt").write_text(
        "You are a helpful assistant running on {name}. Today is {today}; yesterday was {yesterday}.\n"
    )
    (out / "README.md").write_text(
        "# Tiny random-weight Mistral Small 4 replica\n\nWritten by `python -m engine.tiny` with "
        f"shape {json.dumps(asdict(shape))}. Its answers are random text.\n"
    )
    write_shards(all_tensors(shape), out, shape.shards)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_from) / name, out / name)
    else:
        write_tokenizer_files(out)
    return out


TOKENIZER_FILES = ("tekken.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def processor_config() -> dict:
    return {
        "processor_class": "PixtralProcessor", "patch_size": 14, "spatial_merge_size": 2,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
        "image_processor": {
            "image_processor_type": "PixtralImageProcessorFast", "size": {"longest_edge": 1540},
            "patch_size": 14, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "do_convert_rgb": True, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    defaults = TinyShape()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    shape = TinyShape(**{f: getattr(args, f) for f in asdict(defaults)})
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        print(f"error: {args.out_dir} is not empty; choose a new folder", file=sys.stderr)
        return 2
    write_tiny_checkpoint(args.out_dir, shape)
    print(f"wrote a tiny checkpoint to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

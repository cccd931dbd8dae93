"""A typed view of the checkpoint's config.json, validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("Mistral3ForConditionalGeneration",)


@dataclass(frozen=True)
class ModelConfig:
    """Fields the engine uses, named as in the checkpoint; derived values below."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    rope_factor: float
    rope_original_max_position: int
    rope_beta_fast: float
    rope_beta_slow: float
    rope_mscale: float
    rope_mscale_all_dim: float
    llama_4_scaling_beta: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    image_token_id: int
    spatial_merge_size: int
    vision_patch_size: int
    vision: dict[str, Any]
    is_fp8: bool
    # How the routed experts are stored: "fp8" or "bf16" (config.json folders), or "nvfp4"
    # (Mistral's native NVFP4 release, engine.checkpoint_native).
    expert_format: str = "fp8"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 times the YaRN mscale squared (mscale_all_dim), as the reference."""
        scale = self.qk_head_dim**-0.5
        if self.rope_mscale_all_dim and self.rope_factor > 1:
            m = 0.1 * self.rope_mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @classmethod
    def from_hf(cls, raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
        """Validate and convert the checkpoint's config.json. Raises CheckpointError."""
        archs = raw.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"{where} describes a {', '.join(archs) or raw.get('model_type', 'unknown')} model; "
                "Quire runs Mistral Small 4 (Mistral3ForConditionalGeneration). "
                "Choose the folder of mistralai/Mistral-Small-4-119B-2603."
            )
        text = raw.get("text_config")
        if not isinstance(text, dict) or text.get("model_type") != "mistral4":
            raise CheckpointError(
                f"{where} has no mistral4 text_config: this is not a Mistral Small 4 checkpoint. "
                "Choose the folder of mistralai/Mistral-Small-4-119B-2603."
            )
        try:
            return cls._from_text(raw, text)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{where} is missing or has an invalid value for {exc}; the file looks damaged. "
                "Copy config.json again from the original model download."
            ) from exc

    @classmethod
    def _from_text(cls, raw: dict[str, Any], text: dict[str, Any]) -> ModelConfig:
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        quant = raw.get("quantization_config") or {}
        vision = raw.get("vision_config") or {}
        if quant and quant.get("quant_method") not in ("fp8",):
            raise ValueError("quantization_config.quant_method (only fp8 is supported)")
        return cls(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=int(text["num_attention_heads"]),
            q_lora_rank=int(text["q_lora_rank"]), kv_lora_rank=int(text["kv_lora_rank"]),
            qk_nope_head_dim=int(text["qk_nope_head_dim"]),
            qk_rope_head_dim=int(text["qk_rope_head_dim"]), v_head_dim=int(text["v_head_dim"]),
            n_routed_experts=int(text["n_routed_experts"]),
            num_experts_per_tok=int(text["num_experts_per_tok"]),
            n_shared_experts=int(text.get("n_shared_experts", 1)),
            moe_intermediate_size=int(text["moe_intermediate_size"]),
            n_group=int(text.get("n_group", 1)), topk_group=int(text.get("topk_group", 1)),
            norm_topk_prob=bool(text.get("norm_topk_prob", True)),
            routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            rope_factor=float(rope.get("factor", 1.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_mscale=float(rope.get("mscale") or 0.0),
            rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
            llama_4_scaling_beta=float(rope.get("llama_4_scaling_beta") or 0.0),
            max_position_embeddings=int(text.get("max_position_embeddings", 1048576)),
            bos_token_id=int(text.get("bos_token_id", 1)), eos_token_id=int(text.get("eos_token_id", 2)),
            pad_token_id=int(text.get("pad_token_id", 11)),
            image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 10))),
            spatial_merge_size=int(raw.get("spatial_merge_size", 2)),
            vision_patch_size=int(vision.get("patch_size", 14)),
            vision=dict(vision), is_fp8=bool(quant), expert_format="fp8" if quant else "bf16",
        )

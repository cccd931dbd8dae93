"""The decoder stack: embeddings, 36 MLA+MoE layers (split across devices in order), norm, lm_head.

Built straight from the checkpoint: dense FP8 linears are dequantized once onto the layer's
device; routed experts stay with the expert backend (resident or offloaded).
Glossary: T tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.checkpoint import Checkpoint
from engine.kv.cache import LatentKVCache
from engine.model.attention import AttentionWeights, PositionTables, mla_attention
from engine.model.decode_graph import DecodeSteps, predict_next_experts
from engine.model.layers import rms_norm
from engine.model.moe import ExpertBackend, MoEWeights, moe_block
from engine.model.names import TEXT, attention_linears, layer_prefix
from engine.model.rope import Rope
from engine.quant import dequantize


@dataclass
class LayerWeights:
    device: torch.device
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    attn: AttentionWeights
    moe: MoEWeights


def load_linear(ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A linear's weight, dequantized (if FP8) with its scale, on `device`."""
    weight = ckpt.get(f"{name}.weight")
    scale_name = f"{name}.weight_scale_inv"
    scale = ckpt.get(scale_name) if scale_name in ckpt.tensors else None
    return dequantize(weight, scale, dtype).to(device)


def load_layer(ckpt: Checkpoint, layer: int, dtype: torch.dtype, device: torch.device) -> LayerWeights:
    p = layer_prefix(layer)

    def plain(name: str) -> torch.Tensor:
        return ckpt.get(f"{p}.{name}").to(dtype=dtype, device=device)

    def lin(name: str) -> torch.Tensor:
        return load_linear(ckpt, f"{p}.{name}", dtype, device)

    attn = AttentionWeights(
        q_a_layernorm=plain("self_attn.q_a_layernorm.weight"),
        kv_a_layernorm=plain("self_attn.kv_a_layernorm.weight"),
        **{n: lin(f"self_attn.{n}") for n in attention_linears(ckpt.config)},
    )
    moe = MoEWeights(
        gate=plain("mlp.gate.weight"),
        shared_gate=lin("mlp.shared_experts.gate_proj"),
        shared_up=lin("mlp.shared_experts.up_proj"),
        shared_down=lin("mlp.shared_experts.down_proj"),
    )
    return LayerWeights(device, plain("input_layernorm.weight"),
                        plain("post_attention_layernorm.weight"), attn, moe)


class DecoderModel:
    """The text model. `layer_devices[i]` says where layer i's dense part lives."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, layer_devices: list[torch.device],
                 experts: ExpertBackend, progress: Callable[[int, int], None] | None = None) -> None:
        cfg = ckpt.config
        self.cfg, self.dtype, self.experts = cfg, dtype, experts
        self.layer_devices = layer_devices
        last = layer_devices[-1]
        # In host memory on every load (1 GB at the real shape): a lookup moves 8 KB per token to
        # the first layer's device, and the GPU keeps that gigabyte for expert slots. A whole
        # prompt's embeddings then stay on the host too, and each prefill chunk moves on its own.
        self.embed_tokens = ckpt.get(f"{TEXT}.embed_tokens.weight").to(dtype=dtype)
        self.layers: list[LayerWeights] = []
        for layer in range(cfg.num_hidden_layers):
            self.layers.append(load_layer(ckpt, layer, dtype, layer_devices[layer]))
            if progress:
                progress(layer + 1, cfg.num_hidden_layers)
        self.norm = ckpt.get(f"{TEXT}.norm.weight").to(dtype=dtype, device=last)
        self.lm_head = ckpt.get("language_model.lm_head.weight").to(dtype=dtype, device=last)
        self.ropes = {dev: Rope(cfg, dev) for dev in set(layer_devices)}
        # Set by the runtime on GPU loads: single-token steps in the static form, captured as
        # CUDA graphs (engine.model.decode_graph); None = the ordinary path.
        self.decode_steps: DecodeSteps | None = None

    def _predict_next_layer(self, i: int, h: torch.Tensor) -> None:
        """Tell the backend layer i+1's likely experts while layer i runs (same device only)."""
        if i + 1 < len(self.layers) and self.layers[i + 1].device == h.device:
            self.experts.expect(i + 1, predict_next_experts(self.cfg, self.layers[i + 1], h))

    def new_cache(self) -> LatentKVCache:
        cfg = self.cfg
        return LatentKVCache(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                             self.dtype, list(self.layer_devices))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.cpu(), self.embed_tokens)  # [T, H] on the host

    def forward(self, embeds: torch.Tensor, cache: LatentKVCache, *, logits_for: str = "last",
                absorb: bool | None = None, should_stop: Callable[[], bool] | None = None
                ) -> torch.Tensor:
        """Run T new tokens (their input embeddings [T, H]) after the cache's committed tokens.

        Returns logits [1, V] for the last token (`logits_for="last"`) or [T, V] ("all").
        """
        num_tokens = embeds.shape[0]
        steps = self.decode_steps
        if num_tokens == 1 and steps is not None and not steps.failed and steps.begin(cache):
            try:
                return self._decode_static(embeds, cache, steps, should_stop)
            finally:
                steps.end()
        tables: dict[torch.device, PositionTables] = {}  # made once per device, not per layer
        h = embeds
        for i, layer in enumerate(self.layers):
            if should_stop is not None and should_stop():
                raise InterruptedError
            h = h.to(layer.device)
            self.experts.begin_layer(i, num_tokens)
            if layer.device not in tables:
                tables[layer.device] = PositionTables.build(
                    self.ropes[layer.device], cache.offset, num_tokens, h.dtype, layer.device)
            x = rms_norm(h, layer.input_layernorm, self.cfg.rms_norm_eps)
            h = h + mla_attention(self.cfg, layer.attn, x, tables[layer.device], cache, i, absorb)
            x = rms_norm(h, layer.post_attention_layernorm, self.cfg.rms_norm_eps)
            if num_tokens == 1 and self.experts.prefetch_enabled:
                self._predict_next_layer(i, h)
            h = h + moe_block(self.cfg, layer.moe, x, i, self.experts)
        cache.commit(num_tokens)
        return self._logits(h, logits_for)

    def _logits(self, h: torch.Tensor, logits_for: str) -> torch.Tensor:
        h = h.to(self.norm.device)
        if logits_for == "last":
            h = h[-1:]
        return F.linear(rms_norm(h, self.norm, self.cfg.rms_norm_eps), self.lm_head)

    def _decode_static(self, embeds: torch.Tensor, cache: LatentKVCache, steps: DecodeSteps,
                       should_stop: Callable[[], bool] | None) -> torch.Tensor:
        """One token through the static decode steps; the routed experts between them as usual."""
        prefetch = self.experts.prefetch_enabled
        h = embeds
        for i, layer in enumerate(self.layers):
            if should_stop is not None and should_stop():
                raise InterruptedError
            h = h.to(layer.device)
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            out = steps.run(i, h, predict=prefetch and nxt is not None and nxt.device == layer.device)
            if out.predicted is not None:
                self.experts.expect(i + 1, out.predicted)
            h = self.experts.decode_step(i, out.x, out.top_idx, out.top_weights, out.h, out.shared)
        cache.commit(1)
        return self._logits(h, "last")

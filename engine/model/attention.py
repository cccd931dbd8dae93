"""MLA attention over a latent KV cache: the expanded form for prefill, the absorbed form for decode.

Glossary: T new tokens, S all cached tokens (incl. new), N heads, D nope dims, R rope dims,
V value dims, C kv_lora_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv.cache import LatentKVCache
from engine.model.config import ModelConfig
from engine.model.layers import rms_norm
from engine.model.rope import Rope, apply_interleaved


@dataclass
class PositionTables:
    """What every layer on one device shares for a forward: rope tables, query scale, mask."""

    cos: torch.Tensor  # [T, R/2]
    sin: torch.Tensor  # [T, R/2]
    q_scale: torch.Tensor  # [T, 1, 1]
    mask: torch.Tensor  # [T, S] True where a query may attend

    @classmethod
    def build(cls, rope: Rope, offset: int, num_tokens: int, dtype: torch.dtype,
              device: torch.device) -> PositionTables:
        positions = torch.arange(offset, offset + num_tokens, device=device)
        cos, sin = rope.cos_sin(positions, dtype)
        q_scale = rope.query_scale(positions, dtype)[:, None, None]
        return cls(cos, sin, q_scale, _causal_mask(positions, offset + num_tokens, offset))

# At or below this many new tokens, the absorbed form is cheaper (no re-expansion of the cache).
ABSORB_MAX_TOKENS = 16
# Long prefill: queries attend in blocks of this many, so the [T, S] mask and any
# materialised scores stay small at 128K-256K keys.
QUERY_BLOCK = 2048


@dataclass
class AttentionWeights:
    q_a_proj: torch.Tensor  # [Q, H]
    q_a_layernorm: torch.Tensor  # [Q]
    q_b_proj: torch.Tensor  # [N*(D+R), Q]
    kv_a_proj_with_mqa: torch.Tensor  # [C+R, H]
    kv_a_layernorm: torch.Tensor  # [C]
    kv_b_proj: torch.Tensor  # [N*(D+V), C]
    o_proj: torch.Tensor  # [H, N*V]


def mla_attention(cfg: ModelConfig, w: AttentionWeights, x: torch.Tensor, tables: PositionTables,
                  cache: LatentKVCache, layer: int, absorb: bool | None = None) -> torch.Tensor:
    """x: [T, H] normed hidden states of the T tokens after the cache's; returns [T, H]."""
    n, d, r, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    num_tokens = x.shape[0]
    q = F.linear(rms_norm(F.linear(x, w.q_a_proj), w.q_a_layernorm, cfg.rms_norm_eps), w.q_b_proj)
    q = q.view(num_tokens, n, d + r)  # [T, N, D+R]
    q_nope, q_pe = q[..., :d], q[..., d:]
    compressed = F.linear(x, w.kv_a_proj_with_mqa)  # [T, C+R]
    kv_latent = rms_norm(compressed[:, :c], w.kv_a_layernorm, cfg.rms_norm_eps)  # [T, C]
    q_pe = apply_interleaved(q_pe, tables.cos, tables.sin)  # [T, N, R]
    k_pe = apply_interleaved(compressed[:, c:], tables.cos, tables.sin)  # [T, R]
    latent_all, k_pe_all = cache.update_and_fetch(layer, kv_latent, k_pe)  # [S, C], [S, R]
    q_nope, q_pe = q_nope * tables.q_scale, q_pe * tables.q_scale
    mask = tables.mask  # [T, S]
    use_absorbed = num_tokens <= ABSORB_MAX_TOKENS if absorb is None else absorb
    if use_absorbed:
        out = _absorbed(cfg, w, q_nope, q_pe, latent_all, k_pe_all, mask)
    else:
        out = _expanded(cfg, w, q_nope, q_pe, latent_all, k_pe_all, mask)
    return F.linear(out.reshape(num_tokens, n * cfg.v_head_dim), w.o_proj)


def _causal_mask(positions: torch.Tensor, num_keys: int, offset: int) -> torch.Tensor:
    """True where a query may attend: key index <= the query's index in the cache."""
    query_index = torch.arange(positions.shape[0], device=positions.device) + offset  # [T]
    key_index = torch.arange(num_keys, device=positions.device)  # [S]
    return key_index[None, :] <= query_index[:, None]  # [T, S]


def _expanded(cfg: ModelConfig, w: AttentionWeights, q_nope: torch.Tensor, q_pe: torch.Tensor,
              latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Re-expand the latent cache to per-head keys/values, then ordinary attention."""
    n, d, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    s = latent.shape[0]
    kv = F.linear(latent, w.kv_b_proj).view(s, n, d + v)  # [S, N, D+V]
    k_nope, value = kv[..., :d], kv[..., d:]
    key = torch.cat([k_nope, k_pe[:, None, :].expand(s, n, -1)], dim=-1)  # [S, N, D+R]
    query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [N, T, D+R]
    key, value = key.transpose(0, 1), value.transpose(0, 1)  # [N, S, D+R], [N, S, V]
    blocks = []
    for lo in range(0, query.shape[1], QUERY_BLOCK):
        hi = lo + QUERY_BLOCK
        # Keys past the block's last query are masked anyway: leave them out.
        visible = mask.shape[1] - mask.shape[0] + min(hi, mask.shape[0])  # offset + last query + 1
        blocks.append(F.scaled_dot_product_attention(
            query[:, lo:hi], key[:, :visible], value[:, :visible],
            attn_mask=mask[lo:hi, :visible], scale=cfg.softmax_scale,
        ))  # [N, t, V]
    return torch.cat(blocks, dim=1).transpose(0, 1)  # [T, N, V]


def _absorbed(cfg: ModelConfig, w: AttentionWeights, q_nope: torch.Tensor, q_pe: torch.Tensor,
              latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fold kv_b into the query and the output so attention runs on the latent cache directly."""
    n, d, v, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    kv_b = w.kv_b_proj.view(n, d + v, c)
    w_uk, w_uv = kv_b[:, :d, :], kv_b[:, d:, :]  # [N, D, C], [N, V, C]
    q_latent = torch.einsum("tnd,ndc->tnc", q_nope, w_uk)  # [T, N, C]
    scores = torch.einsum("tnc,sc->nts", q_latent, latent)  # [N, T, S]
    scores = scores + torch.einsum("tnr,sr->nts", q_pe, k_pe)  # [N, T, S]
    scores = scores.float() * cfg.softmax_scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)  # [N, T, S]
    out_latent = torch.einsum("nts,sc->tnc", probs, latent)  # [T, N, C]
    return torch.einsum("tnc,nvc->tnv", out_latent, w_uv)  # [T, N, V]

"""MLA attention over a latent KV cache: the expanded form for prefill, the absorbed form for decode.

Glossary: T new tokens, S all cached tokens (incl. new), N heads, D nope dims, R rope dims,
V value dims, C kv_lora_rank, Q q_lora_rank, H hidden size; t queries of one query block,
k keys of one key block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv.cache import LatentKVCache
from engine.model import fused_attention
from engine.model.config import ModelConfig
from engine.model.layers import rms_norm
from engine.model.rope import Rope, apply_interleaved


@dataclass
class PositionTables:
    """What every layer on one device shares for a forward: rope tables, query scale, offset.

    The causal mask is made per attention block from `offset`, never for all [T, S] at once:
    an 8192-token chunk at 256K context would need a 2 GiB bool mask.
    """

    cos: torch.Tensor  # [T, R/2]
    sin: torch.Tensor  # [T, R/2]
    q_scale: torch.Tensor  # [T, 1, 1]
    offset: int  # cached tokens before the T new ones

    @classmethod
    def build(cls, rope: Rope, offset: int, num_tokens: int, dtype: torch.dtype,
              device: torch.device) -> PositionTables:
        positions = torch.arange(offset, offset + num_tokens, device=device)
        cos, sin = rope.cos_sin(positions, dtype)
        q_scale = rope.query_scale(positions, dtype)[:, None, None]
        return cls(cos, sin, q_scale, offset)

# At or below this many new tokens, the absorbed form is cheaper (no re-expansion of the cache).
ABSORB_MAX_TOKENS = 16
# Long prefill: queries attend in blocks of this many, so the scores stay small at 128K-256K keys.
QUERY_BLOCK = 2048
# Transient bytes one key block of attention may use (re-expanded keys and values, the block's
# scores and mask). Re-expanding all S keys at once took 3-6 GB at 128K-256K; with this, all of
# mla_attention for a 16K-token chunk needs ~0.8 GiB, leaving the rest of the planner's 1.5 GiB
# per-GPU workspace (engine/placement.py DEFAULT_WORKSPACE_BYTES) to the layer's other
# activations. attention_scratch_bytes() gives the total.
ATTENTION_SCRATCH_BYTES = 256 * 2**20
# Key blocks are whole multiples of this (GEMM-friendly tiles) unless the budget allows fewer.
KEY_BLOCK_ALIGN = 64


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
    n, num_tokens = cfg.num_attention_heads, x.shape[0]
    q_nope, q_pe, kv_latent, k_pe = project(cfg, w, x, tables.cos, tables.sin)
    latent_all, k_pe_all = cache.update_and_fetch(layer, kv_latent, k_pe)  # [S, C], [S, R]
    q_nope, q_pe = q_nope * tables.q_scale, q_pe * tables.q_scale
    use_absorbed = num_tokens <= ABSORB_MAX_TOKENS if absorb is None else absorb
    if use_absorbed:
        out = _absorbed(cfg, w, q_nope, q_pe, latent_all, k_pe_all, tables.offset)
    else:
        out = _expanded(cfg, w, q_nope, q_pe, latent_all, k_pe_all, tables.offset)
    return F.linear(out.reshape(num_tokens, n * cfg.v_head_dim), w.o_proj)


def project(cfg: ModelConfig, w: AttentionWeights, x: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (q_nope [T, N, D], rotated q_pe [T, N, R]) and the cache entries of the T tokens
    (normed latent [T, C], rotated k_pe [T, R])."""
    n, d, r, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    num_tokens = x.shape[0]
    q = F.linear(rms_norm(F.linear(x, w.q_a_proj), w.q_a_layernorm, cfg.rms_norm_eps), w.q_b_proj)
    # Split without keeping a name for q: its buffer is freed once both halves are rescaled.
    q_nope, q_pe = q.view(num_tokens, n, d + r).split([d, r], dim=-1)  # [T, N, D], [T, N, R]
    del q
    compressed = F.linear(x, w.kv_a_proj_with_mqa)  # [T, C+R]
    kv_latent = rms_norm(compressed[:, :c], w.kv_a_layernorm, cfg.rms_norm_eps)  # [T, C]
    q_pe = apply_interleaved(q_pe, cos, sin)  # [T, N, R]
    k_pe = apply_interleaved(compressed[:, c:], cos, sin)  # [T, R]
    return q_nope, q_pe, kv_latent, k_pe


def _causal_mask(q_lo: int, q_hi: int, k_lo: int, k_hi: int, device: torch.device) -> torch.Tensor:
    """[q_hi-q_lo, k_hi-k_lo], True where a query may attend: key index <= the query's cache index.

    q_lo/q_hi are cache indices (offset already added), k_lo/k_hi key indices.
    """
    query_index = torch.arange(q_lo, q_hi, device=device)
    key_index = torch.arange(k_lo, k_hi, device=device)
    return key_index[None, :] <= query_index[:, None]


def _key_block_bytes(cfg: ModelConfig, queries: int, keys: int, dtype: torch.dtype,
                     absorbed: bool = False) -> int:
    """Transient bytes of one (query block, key block) step of attention."""
    n, d, r, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    e = torch.empty((), dtype=dtype).element_size()
    mask = queries * keys  # bool [t, k]
    if absorbed:
        # Two score einsums and their sum in dtype, three fp32 copies (scaled, masked, softmax),
        # the probabilities in dtype; the latent keys need no expansion.
        return n * queries * keys * (4 * e + 12) + mask
    expansion = keys * n * ((d + v) + (d + r)) * e  # kv_b output [k, N, D+V], key [k, N, D+R]
    # Scores as the matmul returns them, their fp32 copy (masked and exponentiated in place) and
    # the probabilities in dtype for the value matmul; also bounds SDPA's math fallback.
    return expansion + n * queries * keys * (2 * e + 4) + mask


def key_block_size(cfg: ModelConfig, queries: int, dtype: torch.dtype,
                   absorbed: bool = False) -> int:
    """Keys per block such that one block step stays within ATTENTION_SCRATCH_BYTES.

    Never below one key, so a budget smaller than one key's cost is exceeded, not deadlocked.
    """
    keys = ATTENTION_SCRATCH_BYTES // _key_block_bytes(cfg, queries, 1, dtype, absorbed)
    return max(1, keys // KEY_BLOCK_ALIGN * KEY_BLOCK_ALIGN if keys >= KEY_BLOCK_ALIGN else keys)


def attention_scratch_bytes(cfg: ModelConfig, query_tokens: int, context_tokens: int,
                            dtype: torch.dtype) -> int:
    """Upper bound on the peak transient bytes of mla_attention for `query_tokens` new tokens
    attending `context_tokens` keys (cached + new), beyond its input x [T, H] and the cache;
    what the planner reserves in its per-GPU workspace for one prefill chunk.

    The peak of four phases: query projections, rope, the attention core (with what
    mla_attention holds meanwhile), o_proj.
    """
    n, d, r, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    c, qr, h = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.hidden_size
    e = torch.empty((), dtype=dtype).element_size()
    t = query_tokens
    queries = n * (d + r) * e  # per token: q, or the rescaled q_nope and q_pe
    latents = (2 * c + 2 * r) * e  # per token: compressed, kv_latent, k_pe
    projections = t * (qr * (2 * e + 8) + queries)  # q_a, its fp32 norm, q
    rope = t * (queries * 2 + 3 * n * r * e + latents + c * 8)  # rotation halves, latent norm
    core = t * (queries + latents) + attention_core_bytes(cfg, t, context_tokens, dtype)
    epilogue = t * (queries + latents + n * v * e + h * e)  # out (reshaped as a view), o_proj
    return max(projections, rope, core, epilogue)


def attention_core_bytes(cfg: ModelConfig, query_tokens: int, context_tokens: int,
                         dtype: torch.dtype) -> int:
    """Upper bound on the transient bytes of _expanded / _absorbed for T queries and S keys."""
    n, d, r, v, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim, cfg.kv_lora_rank)
    e = torch.empty((), dtype=dtype).element_size()
    t, s = query_tokens, context_tokens
    if t <= ABSORB_MAX_TOKENS:
        keys = min(key_block_size(cfg, t, dtype, absorbed=True), s)
        # q_latent [T, N, C] (+ its transpose), fp32 merge state, out_latent, output.
        fixed = n * t * (c * (2 * e + 8) + 16) + n * t * v * e
        return fixed + _key_block_bytes(cfg, t, keys, dtype, absorbed=True)
    tq = min(QUERY_BLOCK, t)
    chunk = t * n * ((d + r) + v) * e  # query [N, T, D+R] and the output [T, N, V]
    query_block = n * tq * (v * (8 + e) + 24)  # acc fp32, PV in dtype + fp32, row stats (max,
    # sum, the next max, and the block max and sum while they are merged)
    keys = min(key_block_size(cfg, tq, dtype), s)
    materialised = query_block + _key_block_bytes(cfg, tq, keys, dtype)
    # Fused: one key block's expansion, the kernel's output and lse, the fp32 merge (state,
    # the incoming block in fp32, the rescaled products); the causal block has t keys.
    fused_keys = max(min(fused_key_block(cfg, dtype), s), tq)
    fused = fused_keys * _expanded_bytes_per_key(cfg, dtype) + n * tq * (v * (e + 16) + 16)
    return chunk + max(materialised, fused)


def _expanded_bytes_per_key(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """kv_b's output [N, D+V], the assembled key [N, D+R] of one key, and the kernel's copies
    of key and value (the CPU kernel pads both to a common width)."""
    n, d, r, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    padded = max(d + r, v)
    return n * ((d + v) + (d + r) + 2 * padded) * torch.empty((), dtype=dtype).element_size()


def fused_key_block(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Keys per block on the fused path (no scores in memory: only the expansion counts)."""
    keys = ATTENTION_SCRATCH_BYTES // _expanded_bytes_per_key(cfg, dtype)
    return max(1, keys // KEY_BLOCK_ALIGN * KEY_BLOCK_ALIGN if keys >= KEY_BLOCK_ALIGN else keys)


class _RunningSoftmax:
    """softmax(scores) @ values accumulated exactly over key blocks (flash-attention style):
    running max and sum in fp32, probabilities in dtype for the value matmul as in the
    reference's eager attention."""

    def __init__(self, like: torch.Tensor, heads: int, queries: int, width: int):
        f32 = torch.float32
        self.max = like.new_full((heads, queries, 1), -math.inf, dtype=f32)
        self.sum = like.new_zeros((heads, queries, 1), dtype=f32)
        self.acc = like.new_zeros((heads, queries, width), dtype=f32)

    def add(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores: [N, t, k] fp32, scaled and masked (consumed in place); values [N, k, W] or
        [k, W] in the compute dtype. The first block must give every query a visible key (key 0
        is visible to all): each row's max is then finite and later fully masked rows add
        exp(-inf) = 0, never NaN."""
        new_max = torch.maximum(self.max, scores.amax(dim=-1, keepdim=True))
        correction = (self.max - new_max).exp_()  # 0 on the first block
        probs = scores.sub_(new_max).exp_()  # [N, t, k], unnormalised
        self.sum.mul_(correction).add_(probs.sum(dim=-1, keepdim=True))
        self.acc.mul_(correction).add_(torch.matmul(probs.to(values.dtype), values).float())
        self.max = new_max

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.acc / self.sum).to(dtype)  # [N, t, W]


def _expanded(cfg: ModelConfig, w: AttentionWeights, q_nope: torch.Tensor, q_pe: torch.Tensor,
              latent: torch.Tensor, k_pe: torch.Tensor, offset: int) -> torch.Tensor:
    """Re-expand the latent cache to per-head keys/values one key block at a time, attention per
    query block. Queries are the outer loop, so keys are re-expanded for each query block
    (~9% more FLOPs at the real shapes) but memory stays bounded for any T."""
    num_keys = latent.shape[0]
    query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [N, T, D+R]
    # Each query block's result goes straight to its rows: no list of blocks to concatenate,
    # and the caller's reshape to [T, N*V] is a view (each was a copy of the chunk's output).
    out = query.new_empty((query.shape[1], query.shape[0], cfg.v_head_dim))  # [T, N, V]
    for lo in range(0, query.shape[1], QUERY_BLOCK):
        hi = min(lo + QUERY_BLOCK, query.shape[1])
        # Keys past the block's last query are masked anyway: leave them out.
        visible = min(offset + hi, num_keys)
        key_block = key_block_size(cfg, hi - lo, query.dtype)
        if visible <= key_block:  # one key block: the plain path, as before key blocking
            key, value = _expand_keys(cfg, w, latent[:visible], k_pe[:visible])
            out[lo:hi] = F.scaled_dot_product_attention(
                query[:, lo:hi], key, value, scale=cfg.softmax_scale,
                attn_mask=_causal_mask(offset + lo, offset + hi, 0, visible, query.device),
            ).transpose(0, 1)  # [t, N, V]
            continue
        if fused_attention.usable(query.device, query.dtype):
            try:
                out[lo:hi] = _expanded_fused(cfg, w, query[:, lo:hi], latent, k_pe,
                                             offset + lo).transpose(0, 1)
                continue
            except RuntimeError as exc:  # the self-test used small shapes: real ones may differ
                if "out of memory" in str(exc).lower():
                    raise
                fused_attention.disable(query.device, query.dtype, exc)
        merge = _RunningSoftmax(query, query.shape[0], hi - lo, cfg.v_head_dim)
        for k_lo in range(0, visible, key_block):
            k_hi = min(k_lo + key_block, visible)
            key, value = _expand_keys(cfg, w, latent[k_lo:k_hi], k_pe[k_lo:k_hi])
            scores = torch.matmul(query[:, lo:hi], key.transpose(1, 2)).float()
            merge.add(_mask_block(scores.mul_(cfg.softmax_scale), offset + lo, k_lo), value)
        out[lo:hi] = merge.result(query.dtype).transpose(0, 1)
    return out


def _expanded_fused(cfg: ModelConfig, w: AttentionWeights, query: torch.Tensor,
                    latent: torch.Tensor, k_pe: torch.Tensor, first: int) -> torch.Tensor:
    """One query block [N, t, D+R] whose first query sits at cache index `first`: the keys
    before it in unmasked blocks, then its own t keys as a causal (square) block, each through
    a fused kernel, merged by log-sum-exp. Only a key block's expansion is in memory, so the
    blocks can be ~25x larger than when scores are materialised."""
    key_block = fused_key_block(cfg, query.dtype)
    merge = fused_attention.LseMerge()
    spans = [(k_lo, min(k_lo + key_block, first), False) for k_lo in range(0, first, key_block)]
    for k_lo, k_hi, causal in spans + [(first, first + query.shape[1], True)]:
        key, value = _expand_keys(cfg, w, latent[k_lo:k_hi], k_pe[k_lo:k_hi])
        merge.add(*fused_attention.block_attention(query, key, value, causal, cfg.softmax_scale))
    return merge.result(query.dtype)


def _expand_keys(cfg: ModelConfig, w: AttentionWeights, latent: torch.Tensor, k_pe: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [k, C], k_pe [k, R] -> per-head keys [N, k, D+R] and values [N, k, V] (views)."""
    n, d, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    keys = latent.shape[0]
    kv = F.linear(latent, w.kv_b_proj).view(keys, n, d + v)  # [k, N, D+V]
    key = torch.cat([kv[..., :d], k_pe[:, None, :].expand(keys, n, -1)], dim=-1)  # [k, N, D+R]
    return key.transpose(0, 1), kv[..., d:].transpose(0, 1)


def _mask_block(scores: torch.Tensor, q_lo: int, k_lo: int) -> torch.Tensor:
    """Mask scores [N, t, k] (first query at cache index q_lo, first key k_lo) in place; blocks
    wholly at or before the first query need no mask."""
    t, k = scores.shape[1], scores.shape[2]
    if k_lo + k - 1 > q_lo:
        scores.masked_fill_(~_causal_mask(q_lo, q_lo + t, k_lo, k_lo + k, scores.device),
                            -math.inf)
    return scores


def absorbed_block(cfg: ModelConfig, q_latent: torch.Tensor, q_pe: torch.Tensor,
                   latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor,
                   w_uv: torch.Tensor) -> torch.Tensor:
    """Absorbed attention over keys [S] in one block; mask [T, S] True where a query may attend.
    -> [T, N, V]."""
    scores = torch.einsum("tnc,sc->nts", q_latent, latent)  # [N, T, S]
    scores = scores + torch.einsum("tnr,sr->nts", q_pe, k_pe)  # [N, T, S]
    scores = scores.float() * cfg.softmax_scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)  # [N, T, S]
    out_latent = torch.einsum("nts,sc->tnc", probs, latent)  # [T, N, C]
    return torch.einsum("tnc,nvc->tnv", out_latent, w_uv)  # [T, N, V]


def absorbed_weights(cfg: ModelConfig, w: AttentionWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b split into the key part folded into queries [N, D, C] and the value part [N, V, C]."""
    n, d, v, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    kv_b = w.kv_b_proj.view(n, d + v, c)
    return kv_b[:, :d, :], kv_b[:, d:, :]


def _absorbed(cfg: ModelConfig, w: AttentionWeights, q_nope: torch.Tensor, q_pe: torch.Tensor,
              latent: torch.Tensor, k_pe: torch.Tensor, offset: int) -> torch.Tensor:
    """Fold kv_b into the query and the output so attention runs on the latent cache directly;
    beyond one key block (16 queries at 256K keys would need ~2 GiB of scores), key blocks."""
    n, c = cfg.num_attention_heads, cfg.kv_lora_rank
    w_uk, w_uv = absorbed_weights(cfg, w)  # [N, D, C], [N, V, C]
    q_latent = torch.einsum("tnd,ndc->tnc", q_nope, w_uk)  # [T, N, C]
    num_tokens, num_keys = q_nope.shape[0], latent.shape[0]
    key_block = key_block_size(cfg, num_tokens, latent.dtype, absorbed=True)
    if num_keys <= key_block:  # one key block: the plain path, as before key blocking
        mask = _causal_mask(offset, offset + num_tokens, 0, num_keys, latent.device)
        return absorbed_block(cfg, q_latent, q_pe, latent, k_pe, mask, w_uv)
    merge = _RunningSoftmax(latent, n, num_tokens, c)
    for k_lo in range(0, num_keys, key_block):
        k_hi = min(k_lo + key_block, num_keys)
        scores = torch.einsum("tnc,sc->nts", q_latent, latent[k_lo:k_hi])  # [N, T, k]
        scores = scores + torch.einsum("tnr,sr->nts", q_pe, k_pe[k_lo:k_hi])
        merge.add(_mask_block(scores.float().mul_(cfg.softmax_scale), offset, k_lo),
                  latent[k_lo:k_hi])
    out_latent = merge.result(latent.dtype).transpose(0, 1)  # [T, N, C]
    return torch.einsum("tnc,nvc->tnv", out_latent, w_uv)  # [T, N, V]

"""The MoE block: router (softmax, group-limited top-k, normalised, scaled), routed experts
through an expert backend, and the shared expert.

Glossary: T tokens, H hidden, E experts, K experts per token, G groups, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.config import ModelConfig
from engine.model.layers import gated_mlp


class ExpertBackend:
    """The routed experts of every layer, behind one interface: what the decoder, the runtime
    and the benchmark ask of a backend, with the defaults of one that holds every expert where it
    computes (engine.experts.resident). The offloaded one (engine.experts.offload) overrides the
    hooks it needs, so callers call them unconditionally."""

    def forward(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                top_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], the router's choices top_idx [T, k] and weights [T, k] -> [T, H]."""
        raise NotImplementedError

    def decode_step(self, layer: int, x: torch.Tensor, top_idx: torch.Tensor,
                    top_weights: torch.Tensor, h: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """One decode token's routed experts, then the layer's end: h + (routed + shared)."""
        return h + (self.forward(layer, x, top_idx, top_weights) + shared)

    @property
    def prefetch_enabled(self) -> bool:
        """Whether the decoder should predict each next layer's experts (and call expect)."""
        return False

    def expect(self, layer: int, predicted_idx: torch.Tensor) -> None:
        """The experts `layer` is predicted to choose for the next decode token."""

    def begin_layer(self, layer: int, num_tokens: int) -> None:
        """A chunk of num_tokens is about to enter `layer` (before its attention)."""

    def release_staging(self) -> None:
        """Free any transient GPU buffers (the vision encoder borrows the workspace)."""

    def counters(self) -> dict[str, float]:
        """Cache and traffic counters for stats and the benchmark."""
        return {}

    def reset_counters(self) -> None:
        """Start counting afresh (after a benchmark's warm-up)."""

    def close(self) -> None:
        """Stop any worker threads."""


@dataclass
class MoEWeights:
    gate: torch.Tensor  # router [E, H]
    shared_gate: torch.Tensor  # [I, H]
    shared_up: torch.Tensor  # [I, H]
    shared_down: torch.Tensor  # [H, I]


def route(cfg: ModelConfig, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (top_weights [T,K], top_idx [T,K]) exactly as the reference router.

    Logits and softmax stay in the activation dtype, as the reference does (routing in fp32
    could pick different experts on near-ties).
    """
    e, g = cfg.n_routed_experts, cfg.n_group
    scores = F.linear(x, gate).softmax(-1)  # [T, E]
    if g > 1:
        group_scores = scores.view(-1, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
        score_mask = group_mask.unsqueeze(-1).expand(-1, g, e // g).reshape(-1, e)  # [T, E]
        choice = scores.masked_fill(~score_mask.bool(), 0.0)
    else:
        choice = scores
    top_idx = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]  # [T, K]
    top_weights = scores.gather(1, top_idx)
    if cfg.norm_topk_prob:
        top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return top_weights * cfg.routed_scaling_factor, top_idx


def moe_block(cfg: ModelConfig, w: MoEWeights, x: torch.Tensor, layer: int,
              experts: ExpertBackend) -> torch.Tensor:
    """x: [T, H] post-attention-normed hidden states; returns routed + shared output [T, H]."""
    top_weights, top_idx = route(cfg, x, w.gate)
    routed = experts.forward(layer, x, top_idx, top_weights)
    return routed + gated_mlp(x, w.shared_gate, w.shared_up, w.shared_down)


class Deferred:
    """An expert output being computed elsewhere (a CPU thread): `result()` blocks for it."""

    def __init__(self, result) -> None:
        self.result = result


def run_experts(x: torch.Tensor, top_idx: torch.Tensor, top_weights: torch.Tensor,
                expert_weights) -> torch.Tensor:
    """Reference-order expert loop: outputs index-added per token in expert id order.

    `expert_weights(e)` returns (gate_up [2I, H], down [H, I]) for expert e on x's device, a
    callable computing the expert's [t, H] output, or a Deferred output. Deferred outputs are
    collected last, so GPU work is queued while a CPU thread computes them; the sum keeps id
    order, so results do not depend on where an expert ran. The routing (a few ids per token)
    is read to the host once, so the loop itself never waits on the GPU.
    """
    routes = _routes(top_idx, x.device)
    out = torch.zeros_like(x)
    # Outputs wait here only from the first Deferred one on (the sum must stay in id order);
    # before that each is added at once, so a prefill chunk never holds all K x T outputs.
    waiting: dict[int, object] = {}
    for e, (token_idx, slot) in routes.items():  # ascending expert id
        source = expert_weights(e)
        if isinstance(source, Deferred):
            waiting[e] = source
            continue
        xs = x if token_idx is None else x[token_idx]
        ys = source(xs) if callable(source) else expert_mlp(xs, *source)
        ys = ys * _weights(top_weights, token_idx, slot)
        if waiting:
            waiting[e] = ys
        else:
            _accumulate(out, token_idx, ys)
    for e, ys in waiting.items():  # insertion order is id order
        token_idx, slot = routes[e]
        if isinstance(ys, Deferred):
            ys = ys.result().to(x.device) * _weights(top_weights, token_idx, slot)
        _accumulate(out, token_idx, ys)
    return out


def _accumulate(out: torch.Tensor, token_idx: torch.Tensor | None, ys: torch.Tensor) -> None:
    if token_idx is None:
        out += ys.to(out.dtype)
    else:
        out.index_add_(0, token_idx, ys.to(out.dtype))


def _routes(top_idx: torch.Tensor, device: torch.device
            ) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | int]]:
    """expert -> (token indices, or None for the single decode token; slot(s) of the choice).

    Decode uses plain ints, so no index tensor is copied to the GPU; several tokens send all
    experts' indices in one page-locked, non-blocking copy (one blocking copy per expert would
    drain the GPU's queue up to 256 times per layer of a prefill chunk).
    """
    if top_idx.shape[0] == 1:
        ids = top_idx[0].tolist()  # on the host: one transfer per layer (none if already there)
        return {e: (None, k) for k, e in sorted(enumerate(ids), key=lambda ke: ke[1])}
    # Sorted by expert with a stable sort of the flat [T*K] choices: each expert's tokens stay in
    # token order, as a loop over tokens would list them (64K choices of a 16K chunk: a few ms
    # here against ~30 ms of Python a layer).
    flat_experts = top_idx.to("cpu").reshape(-1)
    order = torch.sort(flat_experts, stable=True).indices
    num_choices = top_idx.shape[1]
    counts = torch.bincount(flat_experts)
    experts = torch.nonzero(counts).flatten().tolist()
    sizes = counts[experts].tolist()
    flat = torch.cat([order // num_choices, order % num_choices])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    token_idx, slot_idx = flat[: order.numel()], flat[order.numel() :]
    routes, start = {}, 0
    for e, size in zip(experts, sizes, strict=True):
        end = start + size
        routes[e] = (token_idx[start:end], slot_idx[start:end])
        start = end
    return routes


def _weights(top_weights: torch.Tensor, token_idx: torch.Tensor | None, slot):
    if token_idx is not None and isinstance(slot, torch.Tensor):
        slot = slot.to(top_weights.device)
    if token_idx is None:
        return top_weights[0:1, slot : slot + 1]  # [1, 1]
    return top_weights[token_idx, slot, None]  # [t, 1]


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [t, I] each
    return F.linear(F.silu(gate) * up, down)

"""The offload tests' token schedule: one prefill chunk, then one decode step per token."""

from __future__ import annotations

import torch


def prefill_then_decode(model, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits [len(ids), V] for every position: ids[:prefill] in one chunk, then the rest one
    token at a time, through `model`'s forward (engine.runtime.LoadedModel)."""
    cache = model.decoder.new_cache()
    outs = [model.forward(model.embed_ids(ids[:prefill]), cache, logits_for="all")]
    for t in range(prefill, len(ids)):
        outs.append(model.forward(model.embed_ids(ids[t : t + 1]), cache, logits_for="all"))
    return torch.cat(outs)

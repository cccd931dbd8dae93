"""Where a decode token's time goes: torch.profiler tables for a few decode tokens, written
beside the benchmark's JSON (`python -m engine.bench --profile`). On a GPU the first table is
by device time (which kernels), the second by host time (launches, waits, Python): the gap
between a token's wall time and its device time is what launch overhead and syncs cost."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine.bench.measure import fill_cache, sync_cuda


def profile_decode(model, num_tokens: int = 4, warmup: int = 4, depth: int = 0, rows: int = 30) -> str:
    """Text report of num_tokens decode tokens after warmup ones, at a KV depth."""
    cache = model.decoder.new_cache()
    cache.reserve(depth + warmup + num_tokens)
    fill_cache(cache, depth)
    token = 1

    def step() -> None:
        nonlocal token
        token = int(model.forward(model.embed_ids([token]), cache).argmax())

    for _ in range(warmup):
        step()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync_cuda()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(num_tokens):
            step()
        sync_cuda()
    wall_ms = (time.perf_counter() - t0) * 1e3 / num_tokens
    averages = prof.key_averages()
    layers = model.config.num_hidden_layers
    parts = [f"decode profile: {num_tokens} tokens at depth {depth}, {layers} layers measured, "
             f"{wall_ms:.2f} ms per token under the profiler (which adds overhead)\n"]
    if cuda:
        parts += ["\n== by device time ==\n",
                  averages.table(sort_by="self_device_time_total", row_limit=rows)]
    parts += ["\n== by host time ==\n", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "".join(parts)

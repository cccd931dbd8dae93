"""Where a decode token's (and a prefill chunk's) time goes: torch.profiler tables for a few
decode tokens and one prefill chunk, written beside the benchmark's JSON
(`python -m engine.bench --profile`). On a GPU the first table is
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
    wall_ms, averages = _profiled(lambda: [step() for _ in range(num_tokens)])
    layers = model.config.num_hidden_layers
    header = (f"decode profile: {num_tokens} tokens at depth {depth}, {layers} layers measured, "
              f"{wall_ms / num_tokens:.2f} ms per token under the profiler (which adds overhead)\n")
    return header + _tables(averages, rows)


def profile_prefill(model, num_tokens: int, rows: int = 30) -> str:
    """Text report of one prefill chunk of num_tokens (after one unprofiled chunk that compiles
    kernels and allocates the staging buffers), in a fresh cache."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1000, model.config.vocab_size, (num_tokens,), generator=gen).tolist()
    model.forward(model.embed_ids(ids), model.decoder.new_cache())
    wall_ms, averages = _profiled(lambda: model.forward(model.embed_ids(ids), model.decoder.new_cache()))
    header = (f"prefill profile: one {num_tokens}-token chunk, {model.config.num_hidden_layers} "
              f"layers measured, {wall_ms:.1f} ms under the profiler (which adds overhead)\n")
    return header + _tables(averages, rows)


def _profiled(run) -> tuple[float, object]:
    """(wall ms, the profiler's key averages) of run(), the GPU drained before and after."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync_cuda()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        sync_cuda()
    return (time.perf_counter() - t0) * 1e3, prof.key_averages()


def _tables(averages, rows: int) -> str:
    parts = []
    if torch.cuda.is_available():
        parts += ["\n== by device time ==\n",
                  averages.table(sort_by="self_device_time_total", row_limit=rows)]
    parts += ["\n== by host time ==\n", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "".join(parts)

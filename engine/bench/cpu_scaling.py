"""How the CPU expert path scales with threads on this machine: each host format's rate for one
token (GB/s of expert weights) at several thread counts, best of two measurements each.

    python -m engine.bench.cpu_scaling [--out FILE.json] [--threads 16,15,8,4]

Why: the default thread count (engine.experts.cpu_threads) was chosen from one machine's
collapse (the H200 machine's Xeon: int8 at 1.6 GB/s with all 16 cores in the pool while one
core was busy, 17-54 GB/s with 8). This table shows, on any machine, where the rates peak and
whether the default sits there. Run it with the machine otherwise quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from engine.bench.machine import cpu_expert_bandwidth, cpu_name
from engine.experts import int4
from engine.experts.store import HOST_FORMATS

HIDDEN, WIDTH = 4096, 2048  # the real model's expert shape


def default_thread_counts(cores: int) -> list[int]:
    """Every core, one left free (the GPU-load default), half and a quarter of them."""
    return sorted({n for n in (cores, cores - 1, cores // 2, cores // 4) if n >= 1}, reverse=True)


def measure(thread_counts: list[int], formats: list[str], repeats: int = 2) -> dict:
    """{format: {threads: GB/s}}, each the best of `repeats` measurements."""
    before = torch.get_num_threads()
    table: dict[str, dict[int, float]] = {fmt: {} for fmt in formats}
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for fmt in formats:
                best = max(cpu_expert_bandwidth(HIDDEN, WIDTH, torch.bfloat16, fmt) for _ in range(repeats))
                table[fmt][threads] = round(best / 1e9, 2)
    finally:
        torch.set_num_threads(before)
    return table


def render(table: dict) -> str:
    counts = sorted({t for row in table.values() for t in row}, reverse=True)
    lines = ["GB/s of expert weights, one token: " + "  ".join(f"{t:>6} thr" for t in counts)]
    for fmt, row in table.items():
        lines.append(f"{fmt:<34} " + "  ".join(f"{row.get(t, float('nan')):>10.2f}" for t in counts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.bench.cpu_scaling",
                                description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: every "
                   "core, one fewer, half, a quarter)")
    p.add_argument("--formats", default=",".join(f for f in HOST_FORMATS
                                                 if f != "int4" or int4.supports_expert(HIDDEN, WIDTH)))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",") if t] or default_thread_counts(cores)
    if any(t < 1 for t in counts):
        p.error("thread counts must be positive")
    table = measure(counts, [f for f in args.formats.split(",") if f])
    print(f"{cpu_name()}, {cores} logical CPUs, PyTorch {torch.__version__}")
    print(render(table))
    if args.out is not None:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "cores": cores, "gb_per_s": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

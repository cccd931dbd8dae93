"""Checks a model folder without loading it: what it is, whether every file is whole, and how it
would be placed on this machine (the app's "Check plan", for the command line). Reads only the
files' headers, so it takes seconds even for a 120 GB folder copied from a removable drive.

    python -m engine.check DIR [--device auto|cpu|cuda] [--gpu-budget 24GiB]
                               [--context-length 32768] [--host-format auto|int4]

Exit status 0: the folder is whole and the plan fits; 1: it is not whole (the message says what
to copy again) or the plan does not fit; 2: bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import api
from engine.errors import QuireError

LAYOUTS = {"nvfp4": "Mistral's NVFP4 release (params.json, consolidated shards)",
           "fp8": "the FP8 release (config.json, model shards)",
           "bf16": "an unquantised checkpoint (config.json, model shards)"}


def describe(folder: Path) -> list[str]:
    """Lines saying what the folder holds. Raises CheckpointError for a folder that is not whole."""
    from engine.checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config
    files = {t.file for t in (ckpt.native or ckpt.tensors).values() if t.file is not None}
    return [
        f"{folder}: {LAYOUTS.get(cfg.expert_format, cfg.expert_format)}",
        f"  {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts per layer "
        f"(top {cfg.num_experts_per_tok}), hidden {cfg.hidden_size}, vocabulary {cfg.vocab_size:,}"
        + (", vision encoder" if cfg.vision else ""),
        f"  {len(files)} weight file(s), {ckpt.total_bytes / 1e9:.1f} GB, every tensor present and whole",
    ] + cpu_kernel_lines(cfg.expert_format)


def cpu_kernel_lines(expert_format: str) -> list[str]:
    """Whether Quire's C kernel for the folder's expert format built on this machine (it is what
    lets the CPU compute FP8 and NVFP4 experts at speed); nothing for other formats."""
    from engine.experts.compute import cpu_kernel_for

    if expert_format not in ("fp8", "nvfp4"):
        return []
    name = expert_format.upper()
    kernel = cpu_kernel_for(expert_format)
    if kernel is None:
        return [f"  CPU kernel for {name} experts: not built (no working C compiler, or "
                f"QUIRE_CPU_KERNELS=off): the CPU computes them 30-50x slower. Install gcc or clang."]
    return [f"  CPU kernel for {name} experts: built for this CPU ({'AVX2' if kernel.simd else 'portable C'})"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.check", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu-budget", default=None, help="per GPU, e.g. 24GiB (default: free minus a margin)")
    p.add_argument("--context-length", type=int, default=32768)
    p.add_argument("--host-format", default="auto", choices=("auto", "int4"),
                   help="offloaded experts: auto (8-bit) or int4 (opt-in 4-bit)")
    args = p.parse_args(argv)
    from engine.placement import parse_bytes
    from engine.planning import plan_for_folder

    try:
        budget = parse_bytes(args.gpu_budget) if args.gpu_budget else None
    except ValueError as exc:
        p.error(str(exc))
    try:
        lines = describe(args.model_dir.expanduser())
        plan = plan_for_folder(api.PlanModel("check", args.model_dir.expanduser(), args.device, budget,
                                             args.context_length, args.host_format))
    except QuireError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    verdict = plan.summary.removeprefix("fits: ").removeprefix("does not fit: ")
    print(("Fits. " if plan.fits else "Does not fit: ") + verdict)
    for part in plan.parts:
        print(f"  {part.device}: {part.what} ({part.num_bytes / 1e9:.2f} GB)")
    if plan.alternative:
        print(plan.alternative)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())

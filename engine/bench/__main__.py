"""python -m engine.bench: decode and prefill speed, hit rates and ceilings, as one JSON object.

Runs a real model folder (--model) or a synthetic checkpoint at the real shapes with fewer
layers (--layers N; times scaled to 36 layers, and said so in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine import native_build
from engine.bench import machine
from engine.bench.measure import (
    TraceRouting,
    decode_run,
    followup_run,
    head_seconds,
    prefill_run,
    warm_up_prefill,
)
from engine.errors import QuireError
from engine.experts import cpu_threads
from engine.experts.store import HOST_FORMATS
from engine.model import fused_attention

REAL_LAYERS = 36


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: synthetic real shapes)")
    p.add_argument("--layers", type=int, default=2, help="synthetic: layers to build and measure")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "quire-bench")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--gpu-budget", default=None, help="per-GPU budget, e.g. 24GiB")
    p.add_argument("--gpus", default="", help="comma-separated GPU indices")
    p.add_argument("--targets", type=int, default=1)
    p.add_argument("--expert-cache-slots", type=int, default=None, help="override the plan")
    p.add_argument("--routing", choices=("model", "random", "synthetic", "trace"), default="random")
    p.add_argument("--trace", type=Path, help="routing trace file for --routing trace")
    p.add_argument("--depth", default="0,32768", help="decode KV depths, comma-separated")
    p.add_argument("--prefill", default="4096,32768", help="prefill sizes, comma-separated")
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill chunk tokens (default: the engine's choice for the placement)")
    p.add_argument("--followup", default="", help="document sizes for the cached-prefix follow-up test")
    p.add_argument("--question-tokens", type=int, default=30)
    p.add_argument("--tokens", type=int, default=32, help="decode tokens measured per depth")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--host-format", choices=("auto", *HOST_FORMATS), default="auto",
                   help="offloaded experts in RAM: fp8 as shipped, int8 (auto when offloaded), or "
                        "int4 (opt-in: 0.56x the bytes, lossy)")
    p.add_argument("--host-mode", choices=("pinned", "mmap"), default="pinned",
                   help="host expert store (the plan's choice for 36 layers is in 'plan')")
    p.add_argument("--prefetch", action="store_true", help="next-layer expert prefetch on")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="decode eagerly (default: each layer's dense part as a CUDA graph)")
    p.add_argument("--policy", choices=("shift", "lrfu", "lru"), default="shift",
                   help="expert-cache replacement policy")
    p.add_argument("--prefetch-error", type=float, default=0.15,
                   help="forced routing: chance each predicted next-layer expert is wrong")
    p.add_argument("--no-cpu-misses", action="store_true", help="serve misses by PCIe copies only")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="FP8 and NVFP4 experts on the CPU through PyTorch, not Quire's C kernels "
                        "(the baseline they are measured against)")
    p.add_argument("--attention-kernel", choices=("auto", "flash", "efficient"), default="auto",
                   help="CUDA prefill attention kernel (auto: FlashAttention with padded values "
                        "if it passes its self-test, else the memory-efficient one)")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="CPU threads for expert compute (default: one per core, less one on GPU loads "
                        "for the thread that drives the GPU; engine.experts.cpu_threads; -1: every "
                        "core, as before that reservation)")
    p.add_argument("--baseline", choices=("hf", "none"), default="none")
    p.add_argument("--baseline-tokens", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--profile", action="store_true",
                   help="also profile a few decode tokens (torch.profiler tables) into "
                        "OUT.profile.txt (or the work dir)")
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def load_model(args: argparse.Namespace):
    from engine.runtime import LoadedModel, LoadOptions

    folder = args.model
    if folder is None:
        from engine.bench.synthetic import synthetic_checkpoint

        folder = synthetic_checkpoint(args.work_dir, args.layers, nvfp4=args.host_format == "nvfp4")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from engine.checkpoint import Checkpoint
    from engine.placement import parse_bytes
    from engine.planning import make_plan, planned_options

    gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
    context = max(_ints(args.depth) + _ints(args.prefill) + _ints(args.followup) + [0]) \
        + args.tokens + args.question_tokens + 64
    opts = LoadOptions(device=device, dtype=args.dtype, context_length=context,
                       expert_cache_slots=args.expert_cache_slots, num_targets=args.targets,
                       gpus=gpus, host_format=args.host_format, prefetch=args.prefetch,
                       policy=args.policy, cuda_graphs=not args.no_cuda_graphs)
    ckpt = Checkpoint.open(folder)
    budget = parse_bytes(args.gpu_budget) if args.gpu_budget else None
    plan_summary = ""
    if device.startswith("cuda"):
        plan_summary = make_plan(ckpt, device, budget, context, args.expert_cache_slots, args.targets,
                                 as_layers=REAL_LAYERS, host_format=args.host_format).summary()
    # Plan as the full 36-layer model: the measured layers get the slots they would have.
    opts = planned_options(opts, ckpt, budget, as_layers=REAL_LAYERS)
    if opts.expert_cache_slots is None:  # the bench always measures the offload runtime
        opts = replace(opts, expert_cache_slots=0)
    opts = replace(opts, host_mode=args.host_mode)
    model = LoadedModel(folder, opts, ckpt=ckpt)
    model.experts.cpu_misses = not args.no_cpu_misses
    return model, folder, plan_summary


def routing_trace(args: argparse.Namespace, cfg, num_tokens: int):
    from engine.experts.traces import random_trace, read_trace, synthetic_trace

    shape = (num_tokens, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok)
    if args.routing == "random":
        return random_trace(*shape, seed=0)
    if args.routing == "synthetic":
        return synthetic_trace(*shape, seed=0)
    if args.routing == "trace":
        if args.trace is None:
            raise SystemExit("--routing trace needs --trace FILE")
        return read_trace(args.trace)[0]
    return None


def run(args: argparse.Namespace, save=None) -> dict:
    """The benchmark's JSON object; `save(out)` after each stage, so a run cut short (a device
    call's time limit) leaves what it measured."""
    started = time.perf_counter()

    def stage_done(what: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {what}", file=sys.stderr, flush=True)
        if save is not None:
            save(out)

    out: dict = {}
    if args.cpu_threads:  # before the load measures the CPU's rates
        cpu_threads.choose(args.cpu_threads)
    if args.attention_kernel != "auto":
        fused_attention.CUDA_KERNELS = (args.attention_kernel,)
    model, folder, plan_summary = load_model(args)
    cfg = model.config
    experts = model.experts
    num_decode = args.warmup + args.tokens
    trace = routing_trace(args, cfg, max(1, num_decode * len(_ints(args.depth))))
    if trace is not None:
        model.decoder.experts = TraceRouting(experts, trace, args.prefetch_error)
    head_s = head_seconds(model)
    args.chunk = args.chunk or model.prefill_chunk
    out |= {"model": {"folder": str(folder), "synthetic": args.model is None,
                           "layers_measured": cfg.num_hidden_layers, "scaled_to_layers": REAL_LAYERS,
                           "note": f"times scaled from {cfg.num_hidden_layers} to {REAL_LAYERS} layers"},
                 "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "plan": plan_summary,
                 "slots_per_layer": list(model.opts.layer_slots) or model.opts.expert_cache_slots,
                 "machine": machine.describe(cfg.hidden_size, cfg.moe_intermediate_size, model.dtype),
                 "results": []}
    stage_done("loaded")
    decode = decode_rows(model, args, head_s)
    out["results"] += decode
    stage_done("decode")
    if args.profile:
        out |= write_profile(model, args)
    if _ints(args.prefill) or _ints(args.followup):
        warm_up_prefill(model, min(args.chunk, max(_ints(args.prefill) + _ints(args.followup))))
        stage_done("prefill warm-up")
    for size in _ints(args.prefill):
        out["results"].append({"test": f"pp{size}"} | prefill_run(model, size, args.chunk, head_s,
                                                                  REAL_LAYERS))
        stage_done(f"prefill {size}")
    for depth in _ints(args.followup):
        out["results"].append(followup_run(model, depth, args.question_tokens, args.chunk,
                                           args.work_dir / "snapshots", head_s, REAL_LAYERS))
        stage_done(f"follow-up {depth}")
    out |= run_facts(model, args, out["machine"], decode[0] if decode else None)
    if args.baseline == "hf":
        model.close()
        stage_done("measured; the transformers baseline next")
        out |= baseline_figures(folder, args, decode[0] if decode else None)
    out["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        out["peak_gpu_bytes"] = [torch.cuda.max_memory_allocated(i)
                                 for i in range(torch.cuda.device_count())]
    return out


def run_facts(model, args: argparse.Namespace, machine_info: dict, decode: dict | None) -> dict:
    """What the run used (host format, kernels, CUDA graphs) and the ceiling for its decode."""
    store = model.experts.store
    steps = model.decoder.decode_steps
    facts = {"host_format": store.fmt,  # "auto" resolved, after any RAM fallback
             "expert_bytes": store.layers[0].expert_bytes(),  # in that format
             "attention_kernels": {f"{dev} {dtype}".replace("torch.", ""): kernel
                                   for (dev, dtype), kernel in fused_attention._checked.items()},
             "cuda_graphs": steps is not None and not steps.failed,
             "cpu_kernels": cpu_kernels()}
    facts["ceiling"] = ceiling(machine_info, decode, model.config, args, facts["host_format"],
                               facts["expert_bytes"])
    return facts


def baseline_figures(folder: Path, args: argparse.Namespace, decode: dict | None) -> dict:
    """transformers + accelerate offload on the same folder, and our speed-up over it; a
    baseline that cannot run is recorded (our figures stand without it)."""
    from engine.bench.baseline import hf_decode

    try:
        baseline = hf_decode(folder, args.baseline_tokens, REAL_LAYERS)
    except (ImportError, RuntimeError, MemoryError) as exc:
        return {"baseline_error": f"{type(exc).__name__}: {exc}"}
    figures = {"baseline": baseline}
    if decode:
        figures["speedup_vs_baseline"] = decode["avg_ts"] / baseline["tg_ts"]
    return figures


def decode_rows(model, args: argparse.Namespace, head_s: float) -> list[dict]:
    """One row per --depth: decode tok/s, hit rate beside Belady's, bytes per token."""
    from engine.cli import routing_trace as log_to_trace
    from engine.experts.policy import belady_hit_rate

    experts, rows = model.experts, []
    slots = list(model.opts.layer_slots) or model.opts.expert_cache_slots
    for depth in _ints(args.depth):
        experts.routing_log = []
        row = decode_run(model, depth, args.tokens, args.warmup, head_s, REAL_LAYERS)
        # Belady sees the warm-up too (and counts only the measured tokens), as the policy did.
        seen = log_to_trace(experts.routing_log, model.config.num_hidden_layers)
        counters = experts.counters()
        row |= {"test": f"tg{args.tokens} @ d{depth}", "hit_rate": counters["hit_rate"],
                "belady_bypass_hit_rate": belady_hit_rate(
                    seen, slots, warmup_tokens=max(0, len(seen) - args.tokens)),
                "bytes_copied_per_token": counters["bytes_copied"] / args.tokens,
                "bytes_cpu_per_token": counters["bytes_cpu"] / args.tokens}
        # Where the host waited, per token (layers measured, not scaled): on the GPU at each
        # layer's routing, and on the CPU path's experts after the GPU's were done.
        row |= {f"{k}_per_token": counters[k] / args.tokens for k in ("wait_routing_s", "wait_cpu_s")
                if k in counters}
        # cpu_speed_seen: the CPU path's speed in the run over the quiet measurement's
        # (engine.experts.cpu_rate; 0 if no CPU job was timed).
        row |= {k: counters[k] for k in ("prefetch_issued", "prefetch_used", "prefetch_wasted",
                                         "cpu_speed_seen") if k in counters}
        rows.append(row)
    experts.routing_log = None
    return rows


def write_profile(model, args: argparse.Namespace) -> dict:
    """torch.profiler tables of a few decode tokens, and of one prefill chunk when --prefill is
    asked for, beside --out (or in the work dir)."""
    from engine.bench.profiling import profile_decode, profile_prefill

    def target(kind: str) -> Path:  # X.json -> X.profile.txt, X.prefill-profile.txt
        if args.out:
            return args.out.with_suffix(".profile.txt" if kind == "decode" else f".{kind}-profile.txt")
        return args.work_dir / f"{kind}.profile.txt"

    reports = {"decode": lambda: profile_decode(model)}
    if _ints(args.prefill):
        reports["prefill"] = lambda: profile_prefill(model, min(args.chunk, max(_ints(args.prefill))))
    out = {}
    for kind, report in reports.items():
        name = "profile" if kind == "decode" else f"{kind}_profile"
        path = target(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # a diagnostic: never cost the figures measured before it
            path.write_text(report())
            out[f"{name}_file"] = str(path)
        except Exception as exc:  # noqa: BLE001 - profiler support varies by torch build
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    return out


def ceiling(mach: dict, row: dict | None, cfg, args: argparse.Namespace, host_format: str,
            expert_bytes: int) -> dict:
    """The prior-art decode ceiling for the measured hit rate and bandwidths, for experts of
    `expert_bytes` in the host format."""
    from engine.experts.ceiling import decode_ceilings, resident_time

    pcie, hbm = mach.get("pcie_pinned_bytes_per_s"), mach.get("hbm_bytes_per_s")
    if row is None or not pcie or not hbm:
        return {"note": "needs a CUDA GPU (PCIe and HBM bandwidths)"}
    uses = REAL_LAYERS * cfg.num_experts_per_tok
    # Every path's ceiling, whichever ran (with --no-cpu-misses the H200 run once crashed here).
    cpu = mach["cpu_expert_bytes_per_s"].get(host_format, 0.0)
    resident_s = resident_time(row["hit_rate"], hbm, uses_per_token=uses, expert_bytes=expert_bytes)
    c = decode_ceilings(row["hit_rate"], pcie, cpu, resident_s, uses, expert_bytes)
    path = c.pcie_only if args.no_cpu_misses else c.hybrid
    return {"pcie_only_ts": c.pcie_only, "cpu_only_ts": c.cpu_only, "hybrid_ts": c.hybrid,
            "path": "pcie" if args.no_cpu_misses else "pcie+cpu",
            "achieved_over_ceiling": row["avg_ts"] / path}


def cpu_kernels() -> dict[str, str | None]:
    """Which of Quire's C expert kernels serve this run: "avx2", "portable", or None (PyTorch)."""
    from engine.experts import fp8_cpu, nvfp4_cpu

    built = {"fp8": fp8_cpu.kernel(), "nvfp4": nvfp4_cpu.kernel()}
    return {fmt: None if k is None else "avx2" if k.simd else "portable" for fmt, k in built.items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.host_format in ("int8", "int4", "nvfp4") and args.host_mode == "mmap":
        parser.error(f"--host-format {args.host_format} is a copy built in RAM; "
                     "--host-mode mmap serves FP8 from the files (use --host-mode pinned)")
    for name in ("prefill", "followup"):
        if any(size <= 0 for size in _ints(getattr(args, name))):
            parser.error(f"--{name} sizes are token counts above 0; --{name} '' measures none")
    if args.no_cpu_kernels:  # before anything loads them (engine.native_build reads it)
        os.environ[native_build.DISABLE_ENV] = "off"
    def save(partial: dict) -> None:
        if args.out:
            args.out.write_text(json.dumps(partial, indent=2, default=str))

    try:
        result = run(args, save)
    except QuireError as exc:
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

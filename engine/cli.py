"""Command line: python -m engine.cli --model DIR --prompt TEXT [options]

Streams the answer to the terminal (reasoning on stderr, dimmed), or with --json prints one
object with prompt_ids, output_ids, text, reasoning and stats.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from engine import api
from engine.errors import QuireError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.cli", description="Ask Mistral Small 4 offline.")
    p.add_argument("--model", required=True, type=Path, help="model folder")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--image", action="append", type=Path, default=[], help="attach an image (repeatable)")
    p.add_argument("--doc", action="append", type=Path, default=[], help="attach a document (repeatable)")
    p.add_argument("--system", default="", help="system prompt (default: the checkpoint's)")
    p.add_argument("--reasoning-effort", choices=api.REASONING_EFFORTS, default="none")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="temperature 0 (argmax)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--context-length", type=int, default=32768)
    p.add_argument("--expert-cache-slots", type=int, default=None,
                   help="force N expert slots per layer (offload path, also on CPU)")
    p.add_argument("--host-format", choices=("auto", "fp8", "int8", "int4", "nvfp4"), default="auto",
                   help="offloaded experts in host RAM: fp8 as shipped (exact), int8 (fast CPU "
                        "path) or int4 (opt-in: 0.56x the bytes, so more cached experts and "
                        "faster misses; lossy); auto = int8 when experts are offloaded; an NVFP4 "
                        "release folder always holds nvfp4 as shipped")
    p.add_argument("--targets", type=int, default=1,
                   help="split layers over N targets (GPUs, or logical targets on one device)")
    p.add_argument("--gpus", default="", help="comma-separated GPU indices to use")
    p.add_argument("--gpu-budget", default=None,
                   help="VRAM to use per GPU, e.g. 24GiB (default: free memory minus a margin)")
    p.add_argument("--prefetch", action="store_true",
                   help="copy each layer's predicted experts while the previous layer runs")
    p.add_argument("--record-routing", type=Path, default=None,
                   help="write the selected expert ids per token and layer to FILE (.jsonl or .npy)")
    p.add_argument("--session", default="",
                   help="keep this conversation's document prefix cached on disk across runs")
    p.add_argument("--snapshot-dir", type=Path, default=None,
                   help="where --session prefixes are kept (default: the user cache folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    return p


def run(args: argparse.Namespace) -> dict:
    import torch

    from engine.answering import system_prompt_for
    from engine.documents_bridge import load_document
    from engine.generate import Generator
    from engine.runtime import LoadedModel, LoadOptions

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
    snapshot_dir = None
    if args.session:
        snapshot_dir = args.snapshot_dir or default_snapshot_dir()
    opts = LoadOptions(device=device, dtype=args.dtype, context_length=args.context_length,
                       expert_cache_slots=args.expert_cache_slots, num_targets=args.targets, gpus=gpus,
                       snapshot_dir=snapshot_dir, snapshot_min_tokens=64, host_format=args.host_format,
                       prefetch=args.prefetch)
    from engine.checkpoint import Checkpoint
    from engine.placement import parse_bytes
    from engine.planning import planned_options

    budget = parse_bytes(args.gpu_budget) if args.gpu_budget else None
    ckpt = Checkpoint.open(args.model)
    model = LoadedModel(args.model, planned_options(opts, ckpt, budget), ckpt=ckpt)
    if args.record_routing:
        model.experts.routing_log = []
    msg = api.ChatMessage("user", args.prompt, tuple(args.image), tuple(args.doc))
    # The same system prompt as the app: the user's (or the checkpoint's) plus citation rules.
    system = system_prompt_for(api.Ask("cli", (msg,), system_prompt=args.system),
                               model.formatter.default_system)
    prompt = model.formatter.build([msg], system, args.reasoning_effort, load_document)
    params = api.SamplingParams(temperature=0.0 if args.greedy else args.temperature,
                                top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    cache = model.cache_for(args.session, prompt)
    gen = Generator(model, prompt, params, cache, prefill_chunk=model.prefill_chunk)
    in_reasoning = False
    for delta in gen.stream():
        if args.json:
            continue
        if delta.kind == "reasoning":
            sys.stderr.write(("\x1b[2m" if not in_reasoning and sys.stderr.isatty() else "") + delta.text)
            sys.stderr.flush()
            in_reasoning = True
        else:
            if in_reasoning and sys.stderr.isatty():
                sys.stderr.write("\x1b[0m\n")
            in_reasoning = False
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    result = gen.result
    model.keep_cache(args.session, prompt, result.output_ids, cache)
    counters = model.experts.counters()
    stats = asdict(result.stats.to_event("cli", counters))
    stats.pop("request_id")
    stats["finish_reason"] = result.finish_reason
    model.close()  # also finishes the session snapshot's write
    if args.record_routing:
        cfg = model.config
        _write_routing(args.record_routing, model.experts.routing_log, cfg.num_hidden_layers,
                       cfg.n_routed_experts)
    return {"prompt_ids": result.prompt_ids, "output_ids": result.output_ids, "text": result.text,
            "reasoning": result.reasoning, "stats": stats}


def default_snapshot_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("Quire", appauthor=False)) / "kv-snapshots"


def routing_trace(log: list, num_layers: int):
    """The expert backend's per-forward, per-layer [T, K] selections as one [T, L, K] array."""
    import numpy as np

    steps = [np.stack([log[i + layer].numpy() for layer in range(num_layers)], axis=1)
             for i in range(0, len(log), num_layers)]
    return np.concatenate(steps, axis=0)


def _write_routing(path: Path, log: list, num_layers: int, num_experts: int) -> None:
    """--record-routing: per token and layer, the selected expert ids (.jsonl or .npy)."""
    from engine.experts.traces import write_trace

    write_trace(path, routing_trace(log, num_layers), num_experts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except QuireError as exc:
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out))
    else:
        s = out["stats"]
        print(f"\n[{s['output_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tok/s, "
              f"TTFT {s['time_to_first_token_s']:.2f} s, {s['finish_reason']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

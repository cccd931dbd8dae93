"""Synthetic checkpoints at Mistral Small 4's real shapes (fewer layers), written in the real
folder layout so the benchmark exercises the same loader, store and kernels as a real model."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from engine.tiny import TinyShape, write_tiny_checkpoint
from engine.tiny_native import write_tiny_nvfp4_checkpoint

REAL_LAYERS = 36
REAL_SHAPE = TinyShape(
    layers=REAL_LAYERS, hidden=4096, heads=32, q_lora_rank=1024, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, experts=128, top_k=4, groups=1,
    topk_group=1, moe_intermediate=2048, vocab=131072,
    # The vision tower does not take part in decode or text prefill: one small layer keeps
    # the synthetic folder quick to write.
    vision_hidden=1024, vision_layers=1, vision_heads=16, vision_intermediate=4096,
    shards=REAL_LAYERS, seed=0, fast_experts=1,
)


def synthetic_checkpoint(work_dir: Path, num_layers: int, *, tokenizer_from: Path | None = None,
                         shape: TinyShape = REAL_SHAPE, nvfp4: bool = False) -> Path:
    """Write (once; reused when present) a real-shape checkpoint with `num_layers` layers: the
    FP8 release's layout, or with `nvfp4` the NVFP4 release's (engine.tiny_native)."""
    target = Path(work_dir) / f"ms4-synthetic-{'nvfp4-' if nvfp4 else ''}{num_layers}L"
    if target.is_dir():
        return target
    # Written beside it and renamed when whole: a run killed mid-write (a benchmark's time
    # limit) leaves no folder that a later run would take for a whole one.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shape = replace(shape, layers=num_layers, shards=max(2, num_layers))
    write = write_tiny_nvfp4_checkpoint if nvfp4 else write_tiny_checkpoint
    write(partial, shape, tokenizer_from=tokenizer_from)
    os.replace(partial, target)
    return target

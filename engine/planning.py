"""From a model folder and the machine to a placement plan (engine.placement does the maths):
the PlanReady event the app shows before loading, and the slots/split a load uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from engine import api
from engine.checkpoint import Checkpoint, TensorInfo
from engine.errors import OutOfMemoryError
from engine.experts import int4, nvfp4, nvfp4_cpu
from engine.experts.store import host_format_for
from engine.model.names import TEXT, layer_prefix
from engine.placement import (
    HOST_MARGIN_FRACTION,
    HOST_SAFETY_BYTES,
    ModelShape,
    PlacementPlan,
    detect_gpus,
    detect_host_memory,
    plan_placement,
)

log = logging.getLogger(__name__)


def shape_of(ckpt: Checkpoint, host_format: str = "fp8") -> ModelShape:
    """Byte sizes read from the checkpoint's headers (so any variant is planned exactly); the
    experts' in the host format they will be held in (int4 is smaller than as shipped)."""
    cfg, tensors = ckpt.config, ckpt.tensors
    experts = f"{layer_prefix(0)}.mlp.experts."
    expert_tensors = [t for n, t in tensors.items() if n.startswith(experts)
                      and n.endswith(("gate_up_proj", "down_proj"))]
    expert_total = sum(_host_bytes(t, host_format) for t in expert_tensors)
    layer0 = layer_prefix(0) + "."
    dense_layer = sum(t.num_bytes for n, t in tensors.items()
                      if n.startswith(layer0) and not n.startswith(experts))
    # Per-row scale tables of every expert ("auto" is int8 once experts are offloaded): one copy
    # in RAM with the experts, one on the GPU beside the slots (which hold the weights only).
    tables = cfg.n_routed_experts * (2 * cfg.moe_intermediate_size + cfg.hidden_size) * 4 \
        if host_format in ("auto", "int8", "nvfp4") else 0
    vision = sum(t.num_bytes for n, t in tensors.items()
                 if n.startswith(("vision_tower.", "multi_modal_projector.")))
    return ModelShape.from_config(
        num_layers=cfg.num_hidden_layers, num_experts=cfg.n_routed_experts,
        experts_per_token=cfg.num_experts_per_tok,
        expert_bytes=expert_total // cfg.n_routed_experts, dense_bytes_per_layer=dense_layer + tables,
        host_expert_bytes=cfg.num_hidden_layers * (expert_total + tables),
        embed_bytes=tensors[f"{TEXT}.embed_tokens.weight"].num_bytes,
        lm_head_bytes=tensors["language_model.lm_head.weight"].num_bytes
        + tensors[f"{TEXT}.norm.weight"].num_bytes,
        kv_bytes_per_token_per_layer=2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        vision_bytes=vision,
    )


def _host_bytes(t: TensorInfo, host_format: str) -> int:
    *lead, rows, cols = t.shape
    if host_format == "nvfp4":  # blobs (the divisors are counted with the scale tables)
        return math.prod(lead) * rows * nvfp4.blob_width(cols)
    if host_format != "int4":  # fp8 and int8: one byte per weight, like the FP8 as shipped
        return t.num_bytes
    int4.check_shape(rows, cols)
    return math.prod(lead) * rows * int4.blob_width(cols)


def make_plan(ckpt: Checkpoint, device: str, gpu_budget_bytes: int | None, context_length: int,
              expert_slots: int | None = None, num_targets: int = 1,
              as_layers: int | None = None, gpu_indices: tuple[int, ...] = (),
              host_format: str = "fp8") -> PlacementPlan:
    """`as_layers` plans as if the model had that many layers (a benchmark measuring a few
    layers of a synthetic checkpoint gets the expert slots the full 36-layer model would)."""
    if not gpu_indices and device.startswith("cuda:"):  # one named card: plan on it alone
        gpu_indices = (int(device.split(":")[1]),)
    gpus = detect_gpus(gpu_indices) if device in ("auto", "cuda") or device.startswith("cuda") else []
    gpus = [g for g in gpus if not gpu_indices or g.index in gpu_indices]  # --gpus: these cards only
    host_total, host_available = detect_host_memory()
    targets = None
    if not gpus:
        targets = ["cpu"] * max(1, num_targets)
    elif num_targets > len(gpus):
        targets = [f"cuda:{gpus[i % len(gpus)].index}" for i in range(num_targets)]
    shape = shape_of(ckpt, host_format)
    if as_layers:
        shape = replace(shape, num_layers=as_layers,
                        host_expert_bytes=shape.host_expert_bytes // shape.num_layers * as_layers)
    return plan_placement(shape, gpus, host_available_bytes=host_available,
                          host_total_bytes=host_total, context_length=context_length,
                          targets=targets, gpu_budget=gpu_budget_bytes,
                          expert_slots_per_layer=expert_slots)


def plan_for_folder(req: api.PlanModel) -> api.PlanReady:
    ckpt = Checkpoint.open(Path(req.model_dir).expanduser())
    requested = host_format_for(ckpt.config, req.host_format)

    def plan_for(host_format: str) -> PlacementPlan:
        return make_plan(ckpt, req.device, req.gpu_budget_bytes, req.context_length,
                         host_format=host_format)

    plan, fmt = plan_in_format(requested, plan_for)
    parts = tuple(api.PlanPart(dev, what, int(n)) for dev, what, n in plan.to_parts())
    gpu_bytes = sum(t.used_bytes for t in plan.targets if t.is_gpu)
    host = plan.shape.host_expert_bytes if plan.host_store == "pinned" else 0
    summary = plan.summary() if fmt == requested else f"{INT4_NEEDS_RAM}: {plan.summary()}"
    if fmt == "nvfp4" and not any(t.is_gpu for t in plan.targets) and not nvfp4_cpu.available() \
            and not cpu_keeps_experts_resident(ckpt, detect_host_memory()[1]):
        summary = f"{summary.rstrip('.')}. {NVFP4_ON_CPU}."
    return api.PlanReady(req.request_id, Path(req.model_dir), plan.fits, summary, parts, host,
                         gpu_bytes, _other_precision(ckpt, plan, fmt, plan_for))


def _other_precision(ckpt: Checkpoint, plan: PlacementPlan, fmt: str,
                     plan_for: Callable[[str], PlacementPlan]) -> str:
    """One sentence on what the other expert precision would cache on the GPUs ("" where it
    does not apply: no GPU, a model int4 cannot take, or RAM too short for int4; the NVFP4
    release has one precision, as shipped)."""
    if not any(t.is_gpu for t in plan.targets) or fmt == "nvfp4":
        return ""
    other = "auto" if fmt == "int4" else "int4"  # 8-bit is "auto": int8 once offloaded
    cfg = ckpt.config
    if other == "int4" and not int4.supports_expert(cfg.hidden_size, cfg.moe_intermediate_size):
        return ""
    alt = plan_for(other)
    if other == "int4" and alt.host_store != "pinned":
        return ""
    if alt.fits and plan.fits and alt.num_expert_slots == plan.num_expert_slots:
        return ""  # both cache the same (e.g. every expert): nothing to choose between
    name = "4-bit experts (faster, less exact)" if other == "int4" else "8-bit experts (more exact)"
    if alt.host_store != "pinned":
        name += ", memory-mapped from disk (slower)"
    verdict = f"{alt.num_expert_slots:,} of {alt.shape.num_total_experts:,} experts cached on the GPU" \
        if alt.fits else "does not fit"
    now = f", against {plan.num_expert_slots:,} now" if plan.fits else ""
    return f"With {name}: {verdict}{now}."


NVFP4_ON_CPU = ("Without a GPU, NVFP4 experts are computed slowly here: Quire's CPU kernel for them "
                "could not be built (it needs a C compiler such as gcc); a GPU, a C compiler, or "
                "the FP8 release answers far faster")
INT4_NEEDS_RAM = "4-bit experts need more free RAM than this machine has; planned with 8-bit ones"


def plan_in_format(host_format: str, plan_for: Callable[[str], PlacementPlan]) -> tuple[PlacementPlan, str]:
    """(plan, the host format it holds). int4 exists only as a requantised copy in RAM: when RAM
    is short (the plan maps the files instead), the store serves FP8 from the mapped files,
    whose larger experts need a plan of their own."""
    plan = plan_for(host_format)
    if host_format == "nvfp4" and plan.host_store == "mmap":
        experts = plan.shape.host_expert_bytes
        raise nvfp4_needs_ram(experts, int(experts * (1 + HOST_MARGIN_FRACTION)) + HOST_SAFETY_BYTES)
    if host_format == "int4" and plan.host_store == "mmap":
        log.warning("%s (FP8 served from the memory-mapped files)", INT4_NEEDS_RAM)
        return plan_for("fp8"), "fp8"
    return plan, host_format


def cpu_keeps_experts_resident(ckpt: Checkpoint, available: int) -> bool:
    """Whether a CPU load holds every expert dequantised (bf16, two bytes per weight) in RAM:
    when that takes under half the free RAM; else the host store serves them in its format."""
    cfg = ckpt.config
    return 6 * cfg.num_hidden_layers * cfg.n_routed_experts * cfg.hidden_size \
        * cfg.moe_intermediate_size < available // 2


def nvfp4_needs_ram(expert_bytes: int, need_bytes: int) -> OutOfMemoryError:
    """NVFP4 blobs are built in RAM at load (no memory-mapped fallback): the error for a machine
    that does not have it. `need_bytes`: the free RAM the plan asks for (experts and headroom)."""
    have = detect_host_memory()[1] / 1e9
    return OutOfMemoryError(
        f"The NVFP4 experts ({expert_bytes / 1e9:.0f} GB) need about {need_bytes / 1e9:.0f} GB of "
        f"free RAM with room for the system, and {have:.0f} GB is free. Close other programs, or "
        "use the FP8 release (config.json folder), which Quire can serve from disk when RAM is short.")


def planned_options(opts, ckpt: Checkpoint, gpu_budget_bytes: int | None = None,
                    as_layers: int | None = None):
    """See _placed_options; then host_format "auto" becomes int8 when experts are offloaded
    (PyTorch's int8 CPU kernel reads ~3.7x faster than Quire's FP8 one on 2 cores, 30 against
    8 GB/s, so the CPU serves more misses; the requantisation adds ~0.9% relative weight error
    to FP8's own ~2.7%), else fp8."""
    opts = replace(opts, host_format=host_format_for(ckpt.config, opts.host_format))
    opts = _placed_options(opts, ckpt, gpu_budget_bytes, as_layers)
    if opts.host_format == "auto":
        opts = replace(opts, host_format=auto_host_format(opts.expert_cache_slots, opts.host_mode))
    return opts


def auto_host_format(expert_cache_slots: int | None, host_mode: str) -> str:
    """int8 when experts are offloaded into RAM; FP8 as shipped when every expert is resident,
    or when RAM is short and the experts are served from the mapped files (int8 exists only
    as a requantised copy in RAM, which would not fit)."""
    return "int8" if expert_cache_slots is not None and host_mode != "mmap" else "fp8"


def _placed_options(opts, ckpt: Checkpoint, gpu_budget_bytes: int | None, as_layers: int | None):
    """engine.runtime.LoadOptions completed by the plan. GPU: the plan decides the layer split,
    the expert slots per layer and whether the host store is pinned or mapped (a plan that does
    not fit raises OutOfMemoryError with a smaller proposal). CPU: small models keep every
    expert resident in bf16; one whose experts would not fit RAM that way serves them from the
    host store in its format (memory-mapped FP8 when even that is short)."""
    if not opts.device.startswith("cuda"):
        if opts.expert_cache_slots is not None:
            return opts
        _, available = detect_host_memory()
        if cpu_keeps_experts_resident(ckpt, available):
            return opts
        # In RAM in the host format (int4's and NVFP4's copies are smaller than FP8's).
        expert_bytes = shape_of(ckpt, opts.host_format).host_expert_bytes
        fits_ram = expert_bytes < 0.9 * available
        if not fits_ram and opts.host_format == "nvfp4":
            raise nvfp4_needs_ram(expert_bytes, int(expert_bytes / 0.9))
        return replace(opts, expert_cache_slots=0, host_mode="ram" if fits_ram else "mmap")
    def plan_for(host_format: str) -> PlacementPlan:
        return make_plan(ckpt, opts.device, gpu_budget_bytes, opts.context_length, opts.expert_cache_slots,
                         opts.num_targets, as_layers, tuple(opts.gpus), host_format)

    plan, fmt = plan_in_format(opts.host_format, plan_for)
    opts = replace(opts, host_format=fmt)
    if not plan.fits:
        raise OutOfMemoryError(f"The model does not fit this machine as configured: {plan.summary()}")
    gpus = tuple(t.gpu_index for t in plan.targets if t.gpu_index is not None)
    layer_slots = plan.slots_per_layer()[: ckpt.config.num_hidden_layers]
    num_targets = min(len(plan.targets), ckpt.config.num_hidden_layers)
    return replace(opts, expert_cache_slots=min(layer_slots), layer_slots=layer_slots,
                   num_targets=num_targets, gpus=gpus, host_mode=plan.host_store)

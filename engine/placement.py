"""Placement planner: which device holds which layers, KV cache and expert slots; RAM or mmap.

Pure byte arithmetic (no torch): layers go to the targets in order, lm_head on the last, the
embedding table and the vision encoder in host memory; what a GPU has left becomes expert slots
for its own layers."""

from __future__ import annotations

import heapq
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from engine.errors import InputError

GiB = 1 << 30
DEFAULT_GPU_MARGIN_BYTES = GiB  # CUDA context, fragmentation, other processes
# Per GPU, for a 16K-token prefill chunk at the real shapes (engine.runtime.
# OFFLOADED_PREFILL_CHUNK): the attention phase peaks highest, ~0.8 GiB of bounded attention
# scratch (engine.model.attention) beside the chunk's residual and normed input (0.25 GiB),
# plus the expert streaming buffers (0.2 GiB, engine.experts.streaming); the norms' fp32
# temporaries and the MoE phase stay below that.
DEFAULT_WORKSPACE_BYTES = 3 * GiB // 2
# Reading one image of the largest size (engine.images, 12,100 patches) on the GPU, beside the
# encoder's weights copied in (0.81 GB): its [N, N] bf16 block mask (0.29 GB, perhaps twice
# if the attention kernel pads a copy) and one layer's activations (~0.4 GB); estimated, not
# yet measured on a GPU. The prefill staging buffers are released first (engine.runtime).
VISION_ACTIVATION_BYTES = GiB
HOST_MARGIN_FRACTION = 0.10  # pinned store: experts + 10% (the mission's host-memory rule) ...
HOST_SAFETY_BYTES = 4 * GiB  # ... + room for the OS and the app
MIN_CONTEXT, CONTEXT_STEP = 4096, 1024  # proposals: shortest useful context, its granularity

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10,
          "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'24GiB' -> 25769803776; GB/MB/KB are decimal, GiB/MiB/KiB (and bare G/M/K) binary."""
    if isinstance(text, int):
        return max(0, text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if match is None or (unit := match.group(2).lower()) not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 24GiB, 24GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_gb(num_bytes: float) -> str:
    """Decimal gigabytes, one decimal below 10 GB: '3.1 GB', '18 GB'."""
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes < 9.95e9 else f"{num_bytes / 1e9:.0f} GB"


@dataclass(frozen=True)
class ModelShape:
    """Byte sizes of a MoE model's parts, as the planner needs them."""

    num_layers: int
    num_experts: int  # routed experts per layer
    experts_per_token: int
    expert_bytes: int
    dense_bytes_per_layer: int  # attention, shared expert, router, norms of one layer
    embed_bytes: int
    lm_head_bytes: int  # lm_head + final norm
    kv_bytes_per_token_per_layer: int
    vision_bytes: int = 0
    host_expert_bytes: int = 0  # all routed experts, one copy; 0 = every expert once

    def __post_init__(self) -> None:
        if not 1 <= self.experts_per_token <= self.num_experts or self.num_layers < 1:
            raise ValueError("need num_layers >= 1 and 1 <= experts_per_token <= num_experts")
        if self.host_expert_bytes == 0:
            object.__setattr__(self, "host_expert_bytes", self.num_total_experts * self.expert_bytes)

    @classmethod
    def for_mistral_small_4(cls) -> ModelShape:
        """Mistral Small 4 FP8 as shipped (MISSION.md, performance.md)."""
        return cls(num_layers=36, num_experts=128, experts_per_token=4,
                   expert_bytes=3 * 4096 * 2048,  # gate, up, down in FP8: 25,165,824
                   dense_bytes_per_layer=54_300_000,
                   embed_bytes=131_072 * 4096 * 2, lm_head_bytes=131_072 * 4096 * 2,  # bf16
                   kv_bytes_per_token_per_layer=(256 + 64) * 2,  # MLA latent in bf16: 640
                   vision_bytes=810_000_000)

    @classmethod
    def from_config(cls, config: Mapping[str, int] | None = None, **numbers: int) -> ModelShape:
        """From plain numbers (a mapping and/or keywords named like the fields)."""
        return cls(**{**(config or {}), **numbers})

    @property
    def num_total_experts(self) -> int:  # 4,608 for Mistral Small 4
        return self.num_layers * self.num_experts


@dataclass(frozen=True)
class GpuInfo:
    """One physical GPU as seen at start-up."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class TargetPlan:
    """One logical target: a device, its layer range and what it holds."""

    device: str  # "cuda:0" or "cpu"
    gpu_index: int | None
    budget_bytes: int
    first_layer: int
    num_layers: int
    has_lm_head: bool
    has_vision: bool  # reads images: the encoder's weights come in from the host per image
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    slots_per_layer: tuple[int, ...]
    expert_bytes: int

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    @property
    def num_expert_slots(self) -> int:
        return sum(self.slots_per_layer)

    @property
    def expert_cache_bytes(self) -> int:
        return self.num_expert_slots * self.expert_bytes

    @property
    def used_bytes(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.workspace_bytes + self.expert_cache_bytes

    @property
    def is_gpu(self) -> bool:
        return self.gpu_index is not None


@dataclass(frozen=True)
class PlacementPlan:
    """The whole plan: targets in layer order, host store mode, whether it fits and why."""

    shape: ModelShape
    context_length: int
    targets: tuple[TargetPlan, ...]
    host_store: str  # "pinned" or "mmap"
    host_available_bytes: int
    fits: bool
    reasons: tuple[str, ...]
    smaller_plan: PlacementPlan | None = None

    @property
    def num_expert_slots(self) -> int:
        return sum(t.num_expert_slots for t in self.targets)

    def layer_devices(self) -> tuple[str, ...]:
        """Device of every layer, in layer order."""
        return tuple(t.device for t in self.targets for _ in t.layers)

    def slots_per_layer(self) -> tuple[int, ...]:
        return tuple(s for t in self.targets for s in t.slots_per_layer)

    def summary(self) -> str:
        """One line for the model panel, e.g. 'fits: 4.9 GB dense + ... on GPU 0; 116 GB ...'."""
        parts = []
        for t in self.targets:
            where = f"GPU {t.gpu_index}" if t.is_gpu else "CPU"
            where += f" (layers {t.first_layer}-{t.layers.stop - 1})" if len(self.targets) > 1 else ""
            cache = (f" + {format_gb(t.expert_cache_bytes)} expert cache ({t.num_expert_slots:,}"
                     f" of {self.shape.num_total_experts:,} experts)" if t.num_expert_slots else "")
            parts.append(f"{format_gb(t.dense_bytes)} dense{cache} + {format_gb(t.kv_bytes)} KV on {where}")
        store = "in RAM" if self.host_store == "pinned" else "memory-mapped from disk"
        text = f"{'; '.join(parts)}; {format_gb(self.shape.host_expert_bytes)} experts {store}"
        proposal = f" Try: {self.smaller_plan.summary()}" if self.smaller_plan else ""
        return f"fits: {text}" if self.fits else f"does not fit: {' '.join(self.reasons)}{proposal}"

    def to_parts(self) -> list[tuple[str, str, int]]:
        """(device, what, num_bytes) rows for the UI's memory table."""
        rows: list[tuple[str, str, int]] = []
        shape = self.shape
        for t in self.targets:
            items = [(True, f"dense layers {t.first_layer}-{t.layers.stop - 1}",
                      t.num_layers * shape.dense_bytes_per_layer),
                     (t.has_lm_head, "lm_head", shape.lm_head_bytes),
                     (True, f"KV cache ({self.context_length:,} tokens)", t.kv_bytes),
                     (True, f"expert cache ({t.num_expert_slots:,} slots)", t.expert_cache_bytes),
                     (t.workspace_bytes > 0, "workspace", t.workspace_bytes)]
            rows += [(t.device, what, num_bytes) for keep, what, num_bytes in items if keep]
        rows.append(("cpu", "embeddings", shape.embed_bytes))
        if shape.vision_bytes:
            rows.append(("cpu", "vision encoder (copied to the GPU per image)"
                         if self.targets[0].is_gpu else "vision encoder", shape.vision_bytes))
        where = ("cpu", "pinned") if self.host_store == "pinned" else ("disk", "memory-mapped")
        return rows + [(where[0], f"routed experts ({where[1]})", shape.host_expert_bytes)]


_Target = tuple[str, int | None, int]  # device, GPU index, budget
_Budget = int | str | Mapping[int, int | str] | None  # every GPU's, or per GPU index


def _resolve_targets(gpus: Sequence[GpuInfo], targets: Sequence[str] | None, gpu_budget: _Budget,
                     margin_bytes: int, host_available_bytes: int) -> tuple[list[_Target], list[str]]:
    """Map target names to physical devices and split each device's budget among its targets."""
    by_index = {g.index: g for g in gpus}
    names = list(targets) if targets else [f"cuda:{g.index}" for g in gpus] or ["cpu"]
    matches = [re.fullmatch(r"(?:cuda:)?(\d+)", name) for name in names]
    indices = [int(m.group(1)) if m else None for m in matches]
    for name, index in zip(names, indices, strict=True):
        if name != "cpu" and index not in by_index:
            raise InputError(f"No GPU '{name}': this machine has "
                             f"{', '.join(f'cuda:{i}' for i in by_index) or 'no GPUs'}.")
    notes: list[str] = []
    out: list[_Target] = []
    for index in indices:
        if index is None:
            out.append(("cpu", None, host_available_bytes // indices.count(None)))
            continue
        gpu = by_index[index]
        wanted = gpu_budget.get(index) if isinstance(gpu_budget, Mapping) else gpu_budget
        budget = gpu.free_bytes - margin_bytes if wanted is None else parse_bytes(wanted)
        if budget > gpu.free_bytes:
            notes.append(f"GPU {index}: budget {format_gb(budget)} is more than its free "
                         f"{format_gb(gpu.free_bytes)}; using the free memory.")
            budget = gpu.free_bytes
        out.append((f"cuda:{index}", index, max(0, budget) // indices.count(index)))
    return out, notes


def _split_layers(num_layers: int, weights: Sequence[float]) -> list[int]:
    """Layer counts proportional to weights (largest remainder), each target at least one."""
    if len(weights) > num_layers:
        raise InputError(f"{len(weights)} targets but only {num_layers} layers to place.")
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) > num_layers:  # the at-least-one rule overshot: take from the largest
        counts[counts.index(max(counts))] -= 1
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: num_layers - sum(counts)]:
        counts[i] += 1
    return counts


def _fixed_bytes(shape: ModelShape, position: int, num_targets: int) -> int:
    """Bytes beside the layers on a target: only lm_head (on the last). The embedding table and
    the vision encoder stay in host memory: a lookup moves 8 KB per token, and the encoder's
    weights are copied into the (then idle) prefill workspace while an image is read."""
    return shape.lm_head_bytes * (position == num_targets - 1)


def _host_fixed_bytes(shape: ModelShape) -> int:
    return shape.embed_bytes + shape.vision_bytes


def _workspace(shape: ModelShape, position: int, workspace_bytes: int) -> int:
    """A GPU's workspace; the first GPU's also holds the vision encoder while it reads an image."""
    if position == 0 and shape.vision_bytes:
        return max(workspace_bytes, shape.vision_bytes + VISION_ACTIVATION_BYTES)
    return workspace_bytes


def _allocate_slots(num_slots: int, first_layer: int, num_layers: int, num_experts: int,
                    miss_curves: Sequence[Sequence[float]] | None) -> tuple[int, ...]:
    """Spread slots over layers: evenly, or greedily by the largest drop in misses per slot."""
    num_slots = min(num_slots, num_layers * num_experts)
    if miss_curves is None:
        base, extra = divmod(num_slots, num_layers)
        # the remainder goes to the later layers, which route more narrowly
        return tuple(base + (i >= num_layers - extra) for i in range(num_layers))
    counts = [0] * num_layers
    curves = [miss_curves[first_layer + i] for i in range(num_layers)]

    def gain(i: int) -> float:  # misses saved by layer i's next slot
        c = counts[i]
        return curves[i][c] - curves[i][c + 1] if c + 1 < len(curves[i]) else -math.inf

    heap = sorted((-gain(i), i) for i in range(num_layers))  # a sorted list is a heap
    for _ in range(num_slots):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-gain(i), i))
    return tuple(counts)


def plan_placement(
    shape: ModelShape, gpus: Sequence[GpuInfo], *, host_available_bytes: int, context_length: int,
    host_total_bytes: int | None = None, targets: Sequence[str] | None = None,
    gpu_budget: _Budget = None, expert_slots_per_layer: int | None = None,
    miss_curves: Sequence[Sequence[float]] | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, gpu_margin_bytes: int = DEFAULT_GPU_MARGIN_BYTES,
    propose: bool = True,
) -> PlacementPlan:
    """Plan where every part goes; a plan that does not fit carries reasons and a smaller plan.

    Args:
        gpus: the GPUs found (may be empty: a CPU-only plan).
        targets: logical targets in layer order, e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"];
            a device named twice has its budget split between its targets.
        gpu_budget: bytes or "24GiB" for every GPU, or per GPU index; default free minus margin.
        expert_slots_per_layer: force N slots on every layer (CPU targets too).
        miss_curves: per layer, misses with c slots for c = 0..num_experts (lower is better).
    Raises:
        InputError: a target names a GPU that does not exist, or more targets than layers.
    """
    request = {k: v for k, v in locals().items() if k not in ("shape", "gpus", "propose")}
    resolved, notes = _resolve_targets(gpus, targets, gpu_budget, gpu_margin_bytes,
                                       host_available_bytes)
    # Layers in proportion to what each GPU has left after its fixed parts, so every layer
    # gets about as many expert slots; a CPU target counts as an average GPU.
    gpu_room = [max(1, budget - _fixed_bytes(shape, i, len(resolved)) - _workspace(shape, i, workspace_bytes))
                for i, (_, index, budget) in enumerate(resolved) if index is not None]
    cpu_share = sum(gpu_room) / len(gpu_room) if gpu_room else 1.0
    room = iter(gpu_room)
    weights = [float(next(room)) if index is not None else cpu_share for _, index, _ in resolved]
    counts = _split_layers(shape.num_layers, weights)
    plans = [_plan_target(shape, t, i, len(resolved), sum(counts[:i]), counts[i], context_length,
                          expert_slots_per_layer, miss_curves,
                          _workspace(shape, i, workspace_bytes) * (t[1] is not None))
             for i, t in enumerate(resolved)]
    problems = [r for t in plans for r in _target_problems(shape, t)]
    host_store, host_reasons, host_ok = _host_store(shape, plans, host_available_bytes,
                                                    host_total_bytes)
    plan = PlacementPlan(shape, context_length, tuple(plans), host_store, host_available_bytes,
                         not problems and host_ok, tuple(notes + problems + host_reasons))
    return _with_proposal(plan, shape, gpus, request) if not plan.fits and propose else plan


def _plan_target(shape: ModelShape, target: _Target, position: int, num_targets: int,
                 first_layer: int, num_layers: int, context_length: int,
                 forced_slots: int | None, miss_curves: Sequence[Sequence[float]] | None,
                 workspace_bytes: int) -> TargetPlan:
    device, gpu_index, budget = target
    is_last = position == num_targets - 1
    dense = num_layers * shape.dense_bytes_per_layer + _fixed_bytes(shape, position, num_targets)
    kv = num_layers * shape.kv_bytes_per_token_per_layer * context_length
    if forced_slots is not None:
        slots = (min(forced_slots, shape.num_experts),) * num_layers
    elif gpu_index is None:
        slots = (0,) * num_layers  # CPU targets compute misses straight from the host store
    else:
        num_free = max(0, budget - dense - kv - workspace_bytes) // shape.expert_bytes
        slots = _allocate_slots(num_free, first_layer, num_layers, shape.num_experts, miss_curves)
    return TargetPlan(device, gpu_index, budget, first_layer, num_layers, is_last,
                      position == 0 and shape.vision_bytes > 0, dense, kv, workspace_bytes, slots,
                      shape.expert_bytes)


def _target_problems(shape: ModelShape, t: TargetPlan) -> list[str]:
    """Why a GPU target does not fit its budget (empty when it does; CPU targets always do)."""
    # at least one layer's misses must be able to land on the GPU
    experts = max(t.expert_cache_bytes, shape.experts_per_token * shape.expert_bytes)
    need = t.dense_bytes + t.kv_bytes + t.workspace_bytes + experts
    return [] if need <= t.budget_bytes or not t.is_gpu else [
        f"GPU {t.gpu_index} (layers {t.first_layer}-{t.layers.stop - 1}): {format_gb(t.dense_bytes)} "
        f"dense + {format_gb(t.kv_bytes)} KV + {format_gb(t.workspace_bytes)} workspace + "
        f"{format_gb(experts)} experts = {format_gb(need)} exceeds its budget of {format_gb(t.budget_bytes)}."]


def _host_store(shape: ModelShape, plans: Sequence[TargetPlan], available: int,
                total: int | None) -> tuple[str, list[str], bool]:
    """Pinned RAM when experts + 10% + safety fit next to what CPU targets hold, else mmap."""
    on_cpu = sum(t.used_bytes for t in plans if not t.is_gpu) + _host_fixed_bytes(shape)
    pinned_need = int(shape.host_expert_bytes * (1 + HOST_MARGIN_FRACTION)) + HOST_SAFETY_BYTES
    if on_cpu + HOST_SAFETY_BYTES > available:
        return "mmap", [f"RAM: the CPU target needs {format_gb(on_cpu + HOST_SAFETY_BYTES)} with "
                        f"headroom but only {format_gb(available)} is available."], False
    if on_cpu + pinned_need <= available:
        return "pinned", [], True
    return "mmap", [f"RAM is short ({format_gb(available)} available{f' of {format_gb(total)}' if total else ''}, "
                    f"{format_gb(on_cpu + pinned_need)} needed to pin the experts): experts are "
                    f"memory-mapped from disk (slower)."], True


def _with_proposal(plan: PlacementPlan, shape: ModelShape, gpus: Sequence[GpuInfo], kwargs: dict
                   ) -> PlacementPlan:
    """Attach the first smaller plan that fits: shorter context, fewer forced slots, more GPUs."""
    candidates: list[tuple[str, dict]] = []
    forced = kwargs["expert_slots_per_layer"]
    fits = []  # the longest context each GPU target holds
    for t in (t for t in plan.targets if t.is_gpu):
        slots = shape.experts_per_token if forced is None else t.num_layers * min(forced, shape.num_experts)
        room = t.budget_bytes - t.dense_bytes - t.workspace_bytes - slots * shape.expert_bytes
        fits.append(room // (t.num_layers * shape.kv_bytes_per_token_per_layer))
    context = min(fits) // CONTEXT_STEP * CONTEXT_STEP if fits else 0
    if MIN_CONTEXT <= context < plan.context_length:
        candidates.append((f"a context of {context:,} tokens fits.", dict(kwargs, context_length=context)))
    candidates += [(f"{num} forced expert slots per layer fit.",
                    dict(kwargs, expert_slots_per_layer=num)) for num in range((forced or 1) - 1, 0, -1)]
    if gpus and len({t.gpu_index for t in plan.targets} - {None}) < len(gpus):
        candidates.append((f"spreading the layers over all {len(gpus)} GPUs fits.",
                           dict(kwargs, targets=[f"cuda:{g.index}" for g in gpus])))
    for text, trial_kwargs in candidates:
        smaller = plan_placement(shape, gpus, **trial_kwargs, propose=False)
        if smaller.fits:
            return replace(plan, reasons=plan.reasons + (f"Proposal: {text}",), smaller_plan=smaller)
    return replace(plan, reasons=plan.reasons + (
        "No smaller plan fits these devices: raise the GPU budget, use more or larger GPUs, "
        "or run on the CPU.",))


def detect_gpus(indices: tuple[int, ...] = ()) -> list[GpuInfo]:
    """The CUDA GPUs (those of `indices`, else all) with their free memory now; empty without
    torch or CUDA. Only the cards asked for are queried: each query makes a CUDA context
    (~0.5 GB of that card) that lives as long as the process."""
    try:
        import torch
    except ImportError:
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [GpuInfo(i, torch.cuda.get_device_name(i), *reversed(torch.cuda.mem_get_info(i)))
            for i in range(count) if not indices or i in indices]


def detect_host_memory() -> tuple[int, int]:
    """(total, available) host RAM in bytes: /proc/meminfo on Linux, sysconf elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page

"""A loaded model: checkpoint, decoder, expert backend, vision tower (lazy) and formatter,
plus the per-session prefix caches that let follow-up questions skip re-reading documents.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.chat import ChatFormatter, Prompt
from engine.checkpoint import Checkpoint
from engine.errors import InputError
from engine.images import IMG
from engine.kv.cache import LatentKVCache
from engine.model.decode_graph import DecodeSteps
from engine.model.decoder import DecoderModel

ProgressFn = Callable[[int, int], None]
CPU_PREFILL_CHUNK, GPU_PREFILL_CHUNK = 512, 4096
OFFLOADED_PREFILL_CHUNK = 16384  # placement.DEFAULT_WORKSPACE_BYTES is sized for this


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:1"
    dtype: str = "bfloat16"  # "bfloat16" | "float32"
    context_length: int = 32768
    expert_cache_slots: int | None = None  # per layer; None = every expert resident
    layer_slots: tuple[int, ...] = ()  # the plan's slots for each layer (else the above on each)
    num_targets: int = 1  # split layers over this many devices (or logical targets)
    gpus: tuple[int, ...] = ()
    max_sessions: int = 4
    host_mode: str = "pinned"  # "pinned" | "mmap": where offloaded experts live on the host
    # "fp8" (as shipped, exact) | "int8" (per-row, fast CPU kernel) | "int4" (opt-in, 0.56x the
    # bytes, lossy: engine.experts.int4) | "auto" (see planning); the NVFP4 release always
    # holds "nvfp4" as shipped (engine.experts.store.host_format_for)
    host_format: str = "fp8"
    prefetch: bool = False  # copy layer i+1's predicted experts while layer i runs (offload only)
    policy: str = "shift"  # expert-cache replacement: "shift" | "lrfu" | "lru" (engine.experts.policy)
    cuda_graphs: bool = True  # GPU decode: each layer's dense part as one CUDA graph
    snapshot_dir: Path | None = None  # where session prefixes are saved; None = not saved
    snapshot_min_tokens: int = 1024  # shorter prefixes are cheaper to re-read than to restore
    snapshot_budget_bytes: int = 20 * 2**30


def resolve_devices(opts: LoadOptions, num_layers: int) -> list[torch.device]:
    """Layer i's device: layers split in order over the targets (two targets may share a device)."""
    if opts.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("No CUDA GPU is available on this machine; choose the CPU device instead.")
        gpus = list(opts.gpus) or ([int(opts.device.split(":")[1])] if ":" in opts.device else [0])
        targets = [torch.device(f"cuda:{g}") for g in gpus]
    else:
        targets = [torch.device("cpu")]
    num_targets = max(opts.num_targets, len(targets))
    targets = [targets[i % len(targets)] for i in range(num_targets)]
    per = -(-num_layers // num_targets)
    return [targets[min(i // per, num_targets - 1)] for i in range(num_layers)]


class LoadedModel:
    def __init__(self, model_dir: Path, opts: LoadOptions, progress: ProgressFn | None = None,
                 ckpt: Checkpoint | None = None) -> None:
        """`ckpt`: the folder already opened (and validated) by the caller, to skip a re-read."""
        t0 = time.perf_counter()
        self.ckpt = ckpt or Checkpoint.open(model_dir)
        self.config = self.ckpt.config
        if opts.host_format == "auto":
            from engine.planning import auto_host_format

            opts = replace(opts, host_format=auto_host_format(opts.expert_cache_slots, opts.host_mode))
        self.opts = opts
        self.dtype = getattr(torch, opts.dtype)
        self.layer_devices = resolve_devices(opts, self.config.num_hidden_layers)
        # Progress in two halves: the routed experts (most of the bytes), then the dense layers.
        def half(offset: int):
            return None if progress is None else (lambda done, num: progress(offset + done, 2 * num))

        self.experts = self._make_experts(half(0))
        if progress is not None and self.opts.expert_cache_slots is None:
            progress(self.config.num_hidden_layers, 2 * self.config.num_hidden_layers)
        self.decoder = DecoderModel(self.ckpt, self.dtype, self.layer_devices, self.experts,
                                    half(self.config.num_hidden_layers))
        if opts.cuda_graphs and any(d.type == "cuda" for d in self.layer_devices):
            self.decoder.decode_steps = DecodeSteps(self.decoder, use_graphs=True)
        self._formatter: ChatFormatter | None = None
        self.context_length = min(opts.context_length, self.config.max_position_embeddings)
        self._vision = None
        self.sessions: OrderedDict[str, tuple[list[int], LatentKVCache]] = OrderedDict()
        self.snapshots = None
        if opts.snapshot_dir is not None:
            from engine.kv.snapshot import SnapshotStore, model_identity

            self.snapshots = SnapshotStore(opts.snapshot_dir, model_identity(self.ckpt.path, opts.dtype),
                                           opts.snapshot_budget_bytes)
        self._saved_digest: dict[str, str] = {}
        self.load_seconds = time.perf_counter() - t0

    def _make_experts(self, progress: ProgressFn | None):
        if self.opts.expert_cache_slots is None:
            from engine.experts.resident import ResidentExperts

            return ResidentExperts(self.ckpt, self.dtype, self.layer_devices)
        from engine.experts.offload import OffloadedExperts

        experts = OffloadedExperts(self.ckpt, self.dtype, self.layer_devices,
                                   slots_per_layer=self.opts.layer_slots or self.opts.expert_cache_slots,
                                   host_mode=self.opts.host_mode, host_format=self.opts.host_format,
                                   prefetch=self.opts.prefetch, policy=self.opts.policy,
                                   progress=progress)
        gpus = sorted({d for d in self.layer_devices if d.type == "cuda"}, key=str)
        if gpus:
            from engine.experts.cpu_threads import leave_one_core_to_the_gpu
            from engine.experts.profile import load_or_measure

            leave_one_core_to_the_gpu()
            cfg = self.config
            experts.profiles = {d: load_or_measure(d, experts.store.fmt, cfg.hidden_size,
                                                   cfg.moe_intermediate_size, self.dtype) for d in gpus}
        return experts

    # ------------------------------------------------------------------ forward helpers
    @property
    def formatter(self) -> ChatFormatter:
        """The tokenizer and template, loaded on first use (a few seconds for 131K tokens)."""
        if self._formatter is None:
            self._formatter = ChatFormatter(self.ckpt.path)
        return self._formatter

    @property
    def vision(self):
        if self._vision is None:
            from engine.model.vision import VisionTower

            self._vision = VisionTower(self.ckpt, self.dtype, self.layer_devices[0])
        return self._vision

    @property
    def prefill_chunk(self) -> int:
        """Tokens per prefill forward. Offloaded on a GPU, every chunk streams each layer's
        experts once (116 GB over PCIe, ~2 s), so chunks are long: 16K tokens read 32K in two
        passes and 128K in eight; the placement plan's workspace holds a chunk of this size.
        Resident on a GPU, 4K keeps activations small; on a CPU, 512 keeps cancel and progress
        responsive."""
        if self.layer_devices[0].type != "cuda":
            return CPU_PREFILL_CHUNK
        return OFFLOADED_PREFILL_CHUNK if self.opts.expert_cache_slots is not None else GPU_PREFILL_CHUNK

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.decoder.embed(torch.tensor(ids, dtype=torch.long))

    def embed_prompt(self, prompt: Prompt, start: int) -> torch.Tensor:
        """Embeddings of prompt tokens [start:], with image features at the [IMG] positions."""
        ids = torch.tensor(prompt.ids, dtype=torch.long)
        embeds = self.decoder.embed(ids)
        if prompt.images:
            if not self.config.vision:
                raise InputError("This model has no vision encoder, so it cannot read images.")
            pixels = [torch.from_numpy(img.pixels) for img in prompt.images]
            # The encoder borrows the prefill workspace (engine.placement).
            self.experts.release_staging()
            feats = self.vision.encode(pixels).to(embeds.dtype)
            mask = (ids == IMG).to(embeds.device)
            embeds = embeds.clone()
            embeds[mask] = feats.to(embeds.device)
        return embeds[start:]

    def forward(self, embeds: torch.Tensor, cache: LatentKVCache, **kw) -> torch.Tensor:
        with torch.inference_mode():
            return self.decoder.forward(embeds, cache, **kw)

    # ------------------------------------------------------------------ prefix caches
    def cache_for(self, session: str, prompt: Prompt) -> LatentKVCache:
        """The session's cache trimmed to the longest prefix it shares with `prompt`."""
        key = prompt_key(prompt)
        if session and session in self.sessions:
            cached_key, cache = self.sessions.pop(session)
            cache.trim(common_prefix(cached_key, key))
            return cache
        cache = self.decoder.new_cache()
        snap = self.snapshots.load(session) if (session and self.snapshots) else None
        if snap is not None:
            cache.load_state(snap.state)
            cache.trim(common_prefix(snap.key, key))
            from engine.kv.snapshot import digest_key

            self._saved_digest[session] = digest_key(snap.key)
        return cache

    def keep_cache(self, session: str, prompt: Prompt, output_ids: list[int], cache: LatentKVCache) -> None:
        if not session:
            return
        prefix = prompt_key(prompt)
        key = (prefix + list(output_ids))[: cache.offset]
        self.sessions[session] = (key, cache)
        while len(self.sessions) > self.opts.max_sessions:
            self.sessions.popitem(last=False)
        if self.snapshots is not None and len(prefix) >= self.opts.snapshot_min_tokens:
            from engine.kv.snapshot import digest_key

            digest = digest_key(prefix)
            if self._saved_digest.get(session) != digest:
                self.snapshots.save_in_background(session, prefix, cache.state(len(prefix)))
                self._saved_digest[session] = digest

    def close(self) -> None:
        if self.snapshots is not None:
            self.snapshots.close()  # finish queued snapshot writes
        self.sessions.clear()
        self.experts.close()
        self.ckpt.close()
        # DecodeSteps refers back to the decoder: break the cycle, so the GPU weights, slots and
        # graph pools go when the model is dropped, not at some later garbage collection.
        self.decoder.decode_steps = None


def prompt_key(prompt: Prompt) -> list[int]:
    """Token ids, with each image's [IMG] tokens replaced by a digest of its pixels, so two
    different images of the same size never share a cached prefix."""
    key = list(prompt.ids)
    positions = [i for i, t in enumerate(key) if t == IMG]
    cursor = 0
    for img in prompt.images:
        h, w = img.grid
        digest = -int.from_bytes(hashlib.blake2b(img.pixels.tobytes(), digest_size=6).digest(), "big") - 1
        for _ in range(h * w):
            key[positions[cursor]] = digest
            cursor += 1
    return key


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

"""Serves requests on the engine thread: plan, load, answer, count, read documents, report memory.

Created by engine.service inside the engine thread; raises QuireError for expected failures
(the service turns them into Failed events).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine import api
from engine.errors import CancelledError, NoModelError, OutOfMemoryError

Emit = Callable[[api.Event], None]


class Worker:
    def __init__(self, emit: Emit, is_cancelled: Callable[[str], bool]) -> None:
        self.emit = emit
        self.is_cancelled = is_cancelled
        self.model = None  # engine.runtime.LoadedModel once loaded
        self.is_demo = False

    def handle(self, request: api.Request) -> None:
        handler = getattr(self, f"on_{type(request).__name__}")
        try:
            handler(request)
        except CancelledError:
            self.emit(api.StateChanged(request.request_id, "idle" if self.model else "unloaded"))
            self.emit(api.Finished(request.request_id, "cancelled"))
        except MemoryError as exc:
            raise OutOfMemoryError(
                "The computer ran out of memory. Close other programs, shorten the context length, "
                "or lower the GPU budget, then try again."
            ) from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                if isinstance(request, api.LoadModel):
                    self.close()  # free what the failed load took before proposing
                    _free_gpu_memory()
                raise OutOfMemoryError(
                    "The GPU ran out of memory. " + _smaller_plan_hint() + " Your conversations "
                    "are safe; load again with the smaller setting."
                ) from exc
            raise

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None

    # ------------------------------------------------------------------ model lifecycle
    def on_PlanModel(self, req: api.PlanModel) -> None:
        from engine.planning import plan_for_folder

        self.emit(plan_for_folder(req))
        self.emit(api.Finished(req.request_id, "stop"))

    def on_LoadModel(self, req: api.LoadModel) -> None:
        rid = req.request_id
        self.emit(api.StateChanged(rid, "loading"))
        t0 = time.perf_counter()
        model_dir = Path(req.model_dir).expanduser()
        if req.create_demo and not (model_dir / "config.json").is_file():
            self.emit(api.LoadProgress(rid, 0, 1, "writing demo checkpoint", 0.0))
            write_demo(model_dir)
        from engine.checkpoint import Checkpoint
        from engine.runtime import LoadedModel

        ckpt = Checkpoint.open(model_dir)
        total = ckpt.total_bytes
        if self.model is not None:
            self.close()
            _free_gpu_memory()  # the plan must see the old model's VRAM and pinned RAM free
        opts = _load_options(req, ckpt)
        # The first half of the progress is the routed experts (engine.runtime.LoadedModel):
        # said as what takes the time there, requantising them when offloaded.
        experts_stage = EXPERT_STAGES.get(opts.host_format, "reading weights") \
            if opts.expert_cache_slots is not None else "reading weights"

        def progress(done: int, num: int) -> None:
            if self.is_cancelled(rid):
                raise CancelledError()
            stage = experts_stage if done <= num // 2 else "reading weights"
            self.emit(api.LoadProgress(rid, total * done // num, total, stage, time.perf_counter() - t0))

        self.model = LoadedModel(model_dir, opts, progress, ckpt=ckpt)
        _ = self.model.formatter  # a broken tokenizer fails the load, not the first question
        self.is_demo = req.create_demo
        cfg = self.model.config
        self.emit(api.ModelLoaded(
            rid, model_dir, model_dir.name, self.model.context_length, _device_summary(self.model),
            self.is_demo, bool(cfg.vision), api.REASONING_EFFORTS,
        ))
        self.emit(api.StateChanged(rid, "idle"))
        self.emit(api.Finished(rid, "stop"))

    def on_UnloadModel(self, req: api.UnloadModel) -> None:
        self.close()
        _free_gpu_memory()
        self.emit(api.StateChanged(req.request_id, "unloaded"))
        self.emit(api.Finished(req.request_id, "stop"))

    # ------------------------------------------------------------------ answering
    def _require_model(self):
        if self.model is None:
            raise NoModelError("No model is loaded yet. Load a model folder (or the demo) first.")
        return self.model

    def on_Ask(self, req: api.Ask) -> None:
        from engine.answering import answer

        answer(self._require_model(), req, self.emit, lambda: self.is_cancelled(req.request_id))

    def on_ReadPage(self, req: api.ReadPage) -> None:
        from engine.answering import page_text

        self.emit(page_text(req))
        self.emit(api.Finished(req.request_id, "stop"))

    def on_CountTokens(self, req: api.CountTokens) -> None:
        from engine.answering import system_prompt_for
        from engine.documents_bridge import load_document

        model = self._require_model()
        system = system_prompt_for(req, model.formatter.default_system)
        prompt = model.formatter.build(req.messages, system, req.reasoning_effort, load_document)
        parts = list(prompt.parts)
        doc_tokens = sum(p.num_tokens for p in parts if p.label.startswith(("image ", "document ")))
        system_tokens = sum(p.num_tokens for p in parts if p.label == "system prompt")
        history = max(0, len(prompt.ids) - doc_tokens - system_tokens)
        parts.append(api.TokenCountPart("conversation", history))
        parts.append(api.TokenCountPart("answer reserve", req.max_tokens))
        total = len(prompt.ids) + req.max_tokens
        self.emit(api.TokenCount(req.request_id, total, model.context_length, tuple(parts),
                                 total <= model.context_length))
        self.emit(api.Finished(req.request_id, "stop"))

    def on_ReadDocument(self, req: api.ReadDocument) -> None:
        from engine.documents_bridge import describe_file

        counter = self.model.formatter.encode_text if self.model else None
        self.emit(describe_file(req, counter, lambda: self.is_cancelled(req.request_id)))
        self.emit(api.Finished(req.request_id, "stop"))

    def on_QueryResources(self, req: api.QueryResources) -> None:
        from engine.resources import resource_usage

        self.emit(resource_usage(req.request_id))
        self.emit(api.Finished(req.request_id, "stop"))


def _load_options(req: api.LoadModel, ckpt):
    import torch

    from engine.planning import planned_options
    from engine.runtime import LoadOptions

    device = req.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = LoadOptions(device=device, dtype="bfloat16", context_length=req.context_length,
                       expert_cache_slots=req.expert_cache_slots, snapshot_dir=req.snapshot_dir,
                       host_format=req.host_format)
    return planned_options(opts, ckpt, req.gpu_budget_bytes)


EXPERT_STAGES = {"int4": "preparing 4-bit experts", "int8": "preparing 8-bit experts",
                 "nvfp4": "reading NVFP4 experts"}
FORMAT_NAMES = {"fp8": "8-bit FP8", "int8": "8-bit int8", "int4": "4-bit", "nvfp4": "NVFP4 (4-bit as shipped)"}


def _device_summary(model) -> str:
    devices = sorted({str(d) for d in model.layer_devices})
    mode = "all experts resident" if model.opts.expert_cache_slots is None else (
        f"{model.opts.expert_cache_slots} expert slots per layer, the rest offloaded "
        f"({FORMAT_NAMES.get(model.experts.store.fmt, model.experts.store.fmt)} experts)")
    return f"{', '.join(devices)}; {mode}; loaded in {model.load_seconds:.1f} s"


def _smaller_plan_hint() -> str:
    """A concrete smaller setting: the budget each GPU can give now, with a safety margin."""
    import torch

    if not torch.cuda.is_available():
        return "Shorten the context length or close other programs."
    free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    budget_gib = max(1, int(free / 2**30) - 2)
    return (f"Set the VRAM budget per GPU to {budget_gib} GiB or less (other programs are using "
            "the rest), or shorten the context length.")


def _free_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        # Page-locked blocks freed to PyTorch's pinned allocator stay locked in its cache (the
        # host store: ~108 GB at full size) until this releases them; empty_cache does not.
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def write_demo(target: Path) -> None:
    """Write the tiny demo checkpoint atomically: a crash mid-way never leaves half a folder."""
    from engine.tiny import write_tiny_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_tiny_checkpoint(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

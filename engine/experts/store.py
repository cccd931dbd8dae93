"""The host expert store: every routed expert of every layer, in host memory.

Two modes: "pinned" copies each layer's fused tensors from the memory-mapped shards into
page-locked RAM once (fast PCIe copies, one copy of the weights: the mapping is dropped);
"mmap" serves them straight from the mapped files (RAM short: the OS pages them in).
Formats of an FP8 checkpoint: "fp8" as shipped (exact); "int8" with per-row scales, requantised
once at load, which PyTorch's CPU int8 kernel reads ~14x faster than FP8 (one byte per weight
either way); or, opt-in, "int4" (engine.experts.int4: 0.56x the bytes, lossy). The NVFP4
release's experts stay "nvfp4" as shipped (engine.experts.nvfp4). RAM holds one copy, which
both the PCIe and the CPU path read.
Glossary: E experts, I expert width, H hidden, R rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.checkpoint import Checkpoint, TensorInfo
from engine.errors import InputError
from engine.experts import fp8_cpu, int4, nvfp4
from engine.experts.pinned import host_empty
from engine.model.config import ModelConfig
from engine.model.names import layer_prefix
from engine.quant import FP8_DTYPE

log = logging.getLogger(__name__)

HOST_FORMATS = ("fp8", "int8", "int4", "nvfp4")
NP_DTYPES = {"F8_E4M3": np.uint8, "BF16": np.uint16, "F16": np.float16, "F32": np.float32, "U8": np.uint8}
TORCH_VIEW = {"F8_E4M3": FP8_DTYPE, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
              "U8": torch.uint8}


def host_format_for(cfg: ModelConfig, requested: str) -> str:
    """The host format a load uses: the NVFP4 release's experts stay as shipped whatever was
    asked (its 4-bit experts are already as small as int4's, and more exact than requantising);
    NVFP4 exists only there."""
    if cfg.expert_format == "nvfp4":
        return "nvfp4"
    if requested == "nvfp4":
        raise InputError("NVFP4 experts come only with Mistral's NVFP4 release folder. For this "
                         "model choose 8-bit or 4-bit experts (the model panel's precision, or "
                         "--host-format auto or int4).")
    return requested


def mapped_tensor(info: TensorInfo) -> torch.Tensor:
    """A zero-copy view of a tensor's bytes in its shard, backed by the page cache.

    Copy-on-write mapping: the view is writable for torch's sake, but nothing is ever
    written through it and the file on disk can never change.
    """
    arr = np.memmap(info.file, dtype=NP_DTYPES[info.dtype], mode="c", offset=info.file_offset,
                    shape=info.shape)
    return torch.from_numpy(arr).view(TORCH_VIEW[info.dtype])


@dataclass
class LayerExperts:
    gate_up: torch.Tensor  # [E, 2I, H] FP8 (or bf16 for unquantised checkpoints); int4: blobs
    down: torch.Tensor  # [E, H, I]
    # [E] fp32 multipliers (fp8), [E, 2I] per-row (int8), or [E, 0] (int4: inside the blobs)
    gate_up_scale: torch.Tensor
    down_scale: torch.Tensor  # [E], [E, H] or [E, 0]

    def expert_bytes(self) -> int:  # from shapes, not by indexing (a tensor op per call)
        return math.prod(self.gate_up.shape[1:]) * self.gate_up.element_size() + \
            math.prod(self.down.shape[1:]) * self.down.element_size()


class HostExpertStore:
    """All layers' routed experts on the host, in the format they were shipped in."""

    def __init__(self, ckpt: Checkpoint, mode: str = "pinned", fmt: str = "fp8",
                 progress: Callable[[int, int], None] | None = None,
                 quantize_device: torch.device | None = None) -> None:
        """`quantize_device`: a GPU to requantise int8 / int4 experts on (far faster than the CPU)."""
        if mode not in ("pinned", "mmap", "ram"):
            raise ValueError(f"unknown host store mode {mode!r}")
        if fmt not in HOST_FORMATS:
            raise ValueError(f"unknown host expert format {fmt!r}")
        fmt = host_format_for(ckpt.config, fmt)
        if fmt == "nvfp4" and mode == "mmap":
            # The blobs are built at load (codes and scales are separate tensors in the files),
            # so they need RAM; planning refuses a machine short of it (engine.planning).
            log.warning("NVFP4 experts are built in RAM, not served from the mapped files")
            mode = "ram"
        elif fmt != "fp8" and mode == "mmap":
            # Requantised weights exist only in RAM, which is short (that is why mmap was
            # chosen): serve FP8 as shipped from the mapped files rather than run out of memory.
            log.warning("host format %s needs the experts in RAM; RAM is short, so FP8 is "
                        "served from the memory-mapped files instead", fmt)
            fmt = "fp8"
        self.fmt, self.quantize_device = fmt, quantize_device
        # Page-locked memory needs a CUDA driver; without one "pinned" falls back to plain RAM.
        self.mode = "ram" if mode == "pinned" and not torch.cuda.is_available() else mode
        self.layers: list[LayerExperts] = []
        num_layers = ckpt.config.num_hidden_layers
        for layer in range(num_layers):
            self.layers.append(self._load_layer(ckpt, layer))
            if progress:
                progress(layer + 1, num_layers)

    def _load_layer(self, ckpt: Checkpoint, layer: int) -> LayerExperts:
        if self.fmt == "nvfp4":
            return load_nvfp4_layer(ckpt, layer, self.mode == "pinned")
        p = f"{layer_prefix(layer)}.mlp.experts"
        tensors, scales = [], []
        for name in ("gate_up_proj", "down_proj"):
            mapped = mapped_tensor(ckpt.tensors[f"{p}.{name}"])
            full = f"{p}.{name}_scale_inv"
            num_experts = mapped.shape[0]
            scale = ckpt.get(full).float().reshape(num_experts) if full in ckpt.tensors else \
                torch.ones(num_experts)
            if self.mode == "mmap":  # FP8 only (int8 needs RAM, see __init__)
                tensors.append(mapped)
            elif self.fmt == "int8":  # requantised straight into the (pinned) host tensor
                host = host_empty(mapped.shape, torch.int8, self.mode == "pinned")
                scale = self._on_gpu_or_cpu(lambda dev, s=scale, h=host, m=mapped:
                                            requantize_int8(m, s, h, dev))[1]
                tensors.append(host)
            elif self.fmt == "int4":
                tensors.append(self._on_gpu_or_cpu(lambda dev, s=scale, m=mapped:
                                                   requantize_int4(m, s, self.mode == "pinned", dev)))
                scale = torch.empty((num_experts, 0))
            else:
                host = host_empty(mapped.shape, mapped.dtype, self.mode == "pinned")
                host.copy_(mapped)  # straight from the page cache into (pinned) RAM
                tensors.append(host)
            scales.append(scale)
        return LayerExperts(tensors[0], tensors[1], scales[0], scales[1])

    def _on_gpu_or_cpu(self, requantise):
        """requantise(device) on the GPU when there is one; a GPU that fails it (out of memory,
        a driver problem) hands this and every later layer to the CPU: slower, never a failed
        load. The two give the same bits (see requantize_int8 / requantize_int4)."""
        if self.quantize_device is not None:
            try:
                return requantise(self.quantize_device)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                log.warning("requantising experts on %s failed (%s): the CPU does it instead",
                            self.quantize_device, exc)
                self.quantize_device = None
        return requantise(None)

    @property
    def num_bytes(self) -> int:
        return sum(t.gate_up.numel() * t.gate_up.element_size() + t.down.numel() * t.down.element_size()
                   for t in self.layers)


def load_nvfp4_layer(ckpt: Checkpoint, layer: int, pin: bool) -> LayerExperts:
    """One layer of the NVFP4 release's routed experts as blobs (engine.experts.nvfp4), straight
    from the memory-mapped files into (pinned) RAM: gate_up takes w1's rows then w3's, each
    with its matrix's global divisor as the rows' scale."""
    cfg = ckpt.config
    num_experts, width, hidden = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate_up = host_empty((num_experts, 2 * width, nvfp4.blob_width(hidden)), nvfp4.BLOB_DTYPE, pin)
    down = host_empty((num_experts, hidden, nvfp4.blob_width(width)), nvfp4.BLOB_DTYPE, pin)
    gate_up_div = torch.empty((num_experts, 2 * width))
    down_div = torch.empty((num_experts, hidden))
    for e in range(num_experts):
        p = f"layers.{layer}.experts.{e}"
        for name, blob, div in ((f"{p}.w1", gate_up[e, :width], gate_up_div[e, :width]),
                                (f"{p}.w3", gate_up[e, width:], gate_up_div[e, width:]),
                                (f"{p}.w2", down[e], down_div[e])):
            nvfp4.pack(mapped_tensor(ckpt.native[f"{name}.weight_packed"]),
                       mapped_tensor(ckpt.native[f"{name}.weight_scale"]), blob)
            div.fill_(float(ckpt.get(f"{name}.weight_global_scale").float().reshape(())))
    return LayerExperts(gate_up, down, gate_up_div, down_div)


def requantize_int8(weights: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None,
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 [E, R, C] with per-expert multipliers [E] -> int8 [E, R, C] with per-row scales [E, R].

    One expert at a time, so the temporaries stay small (an expert is 25 MB in FP8). The
    expert's multiplier cancels out of the rounding (a row's codes are its values over its own
    maximum), so it only enters the row scales; and |code| <= 127 by construction, so no clamp.
    On the CPU, Quire's FP8 kernel (engine.experts.fp8_cpu) computes the same codes straight from
    the bytes: 7 ms per 4096x4096 matrix on 2 cores against PyTorch's 71 ms (the real model's
    116 GB in ~50 s instead of ~8 minutes, before disk reads). On a CUDA `device` each expert is
    requantised there, bit for bit the same (every step is an exact or correctly rounded IEEE
    operation on both): FP8 bytes cross PCIe and the GPU does the arithmetic (the GPU load time
    itself is not measured yet).
    """
    out = torch.empty(weights.shape, dtype=torch.int8) if out is None else out  # e.g. pinned
    row_scales = torch.empty(weights.shape[:2], dtype=torch.float32, device=device)
    kernel = fp8_cpu.kernel() if (device is None or device.type == "cpu") \
        and weights.dtype == FP8_DTYPE else None
    for e in range(weights.shape[0]):
        if kernel is not None:  # the same codes from the FP8 bytes, without fp32 temporaries
            peak = kernel.requantize_int8(weights[e], out[e])
        else:  # FP8 bytes over PCIe, widened there (a copy that converts converts on the CPU)
            codes, peak = int8_codes(weights[e].to(device).to(torch.float32))
            out[e].copy_(codes, non_blocking=True)
        row_scales[e] = (peak * (float(scales[e]) / 127.0)).clamp_(min=1e-12)
    if row_scales.is_cuda:
        row_scales = row_scales.cpu()  # synchronises: every copy into `out` has landed
        torch.cuda.empty_cache()  # the temporaries' blocks would not fit the slots made next
    return out, row_scales


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [R, C] (consumed) -> (int8 codes [R, C], the rows' peaks [R]): each row over its own
    largest |w| (at least 1e-30), times 127, rounded half to even."""
    peak = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-30)  # [R]
    return w.mul_((127.0 / peak)[:, None]).round_().to(torch.int8), peak


def requantize_int4(weights: torch.Tensor, scales: torch.Tensor, pin: bool = False,
                    device: torch.device | None = None) -> torch.Tensor:
    """FP8 (or bf16) [E, R, C] with per-expert multipliers [E] -> int4 blobs uint8 [E, R, width]
    (engine.experts.int4), one expert at a time so the temporaries stay small. On a CUDA
    `device` each expert is quantised there: ~0.14 s per expert on two CPU cores (10 minutes for
    the whole model) becomes a copy each way."""
    num_experts, rows, cols = weights.shape
    int4.check_shape(rows, cols)
    out = host_empty((num_experts, rows, int4.blob_width(cols)), torch.uint8, pin)
    for e in range(num_experts):
        w = weights[e] if device is None else weights[e].to(device, non_blocking=pin)
        int4.quantize(w, float(scales[e]), out=out[e])
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # the last copies back into `out` are asynchronous
        # The fp32 temporaries' blocks would stay reserved, too small for the slots made next.
        torch.cuda.empty_cache()
    return out

"""NVFP4 experts on the CPU through a small C kernel (nvfp4_cpu.c, built once per machine by
engine.native_build): what lets the CPU share an NVFP4 model's misses with PCIe, and answer at
all on a machine without a GPU. PyTorch has no CPU kernel for the format; composing its ops
(engine.experts.nvfp4.dequantize, then a matmul) reads the experts at ~0.2 GB/s.

Two entry points, both over an expert matrix's blob and per-row divisors:
  - `matmul`: a few tokens (a decode step's) straight from the blob: AVX2 shuffles turn 16 codes
    into their values at a time, so the weights are read once and never expanded in memory;
  - `dequantize`: the matrix in bf16 or fp32, bit for bit engine.experts.nvfp4.dequantize, for
    many tokens at once (a prefill chunk's), where PyTorch's own matmul then does the work.
Rows are split over the kernel's own threads (engine/experts/cpu_pool.h, engine.experts.cpu_rows).
The library is self-tested against PyTorch when first loaded; if it disagrees, or no compiler
exists, `available()` is False and callers keep the PyTorch path.
Glossary: M tokens, N output rows, K inputs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine import native_build
from engine.experts import nvfp4
from engine.experts.cpu_rows import I64, INT, PTR, bind, check_inputs, spans
from engine.quant import FP8_DTYPE

SOURCE = Path(__file__).with_name("nvfp4_cpu.c")
# Tokens up to which `matmul` beats dequantising once and PyTorch's matmul (the kernel re-reads
# the weights per 8 tokens; measured per expert on 2 cores at the real shapes: 9.7 against
# 17.7 ms at 16 tokens, 25 against 19 ms at 32).
MAX_MATMUL_TOKENS = 16


class Kernel:
    """The loaded library, with its functions' signatures declared."""

    VERSION = "cpu-kernel-2"  # in stored machine profiles' keys: a new kernel is measured again

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.simd = bool(lib.quire_nvfp4_simd())
        self._matmul = bind(lib, "quire_nvfp4_matmul", PTR, I64, I64, PTR, PTR, PTR, I64, PTR)
        self._dequantize = bind(lib, "quire_nvfp4_dequantize", PTR, I64, I64, PTR, PTR, PTR, INT)

    def matmul(self, x: torch.Tensor, blob: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
        """x [M, K] (any float dtype) @ w^T -> [M, N] fp32, w the blob's matrix."""
        n, k = nvfp4.matrix_shape(blob)
        raw, div = _operands(blob, divisors, n)
        check_inputs(x, k)
        m = x.shape[0]
        # Each group of 16 inputs as its 8 even columns, then its 8 odd ones: the kernel's order.
        xp = x.to(torch.float32).reshape(m, k // nvfp4.GROUP, 8, 2).transpose(2, 3).contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        table = _e4m3()
        self._matmul(raw.data_ptr(), raw.stride(0), k, div.data_ptr(), table.data_ptr(), xp.data_ptr(),
                     m, y.data_ptr(), n, *spans(n))
        return y

    def dequantize(self, blob: torch.Tensor, divisors: torch.Tensor,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The blob's matrix [N, K] in bf16 or fp32, as engine.experts.nvfp4.dequantize."""
        if dtype not in (torch.bfloat16, torch.float32):
            return self.dequantize(blob, divisors, torch.float32).to(dtype)
        n, k = nvfp4.matrix_shape(blob)
        raw, div = _operands(blob, divisors, n)
        out = torch.empty(n, k, dtype=dtype)
        as_bf16 = int(dtype == torch.bfloat16)
        table = _e4m3()
        self._dequantize(raw.data_ptr(), raw.stride(0), k, div.data_ptr(), table.data_ptr(),
                         out.data_ptr(), as_bf16, n, *spans(n))
        return out


def _operands(blob: torch.Tensor, divisors: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the blob as host bytes with unit column stride, the divisors as N contiguous fp32)."""
    raw = blob.view(torch.uint8)
    if raw.device.type != "cpu" or raw.stride(1) != 1:
        raise ValueError("the NVFP4 CPU kernel reads host blobs whose rows are contiguous")
    div = divisors.to("cpu", torch.float32).reshape(-1).expand(n).contiguous()
    return raw, div



@functools.cache
def _e4m3() -> torch.Tensor:
    """The 256 E4M3 byte values as fp32, as PyTorch converts them."""
    return torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).to(torch.float32)


def load(portable: bool = False, cache_dir: Path | None = None) -> Kernel | None:
    """The kernel built for this machine and checked against PyTorch, or None (logged)."""
    return native_build.load_checked(SOURCE, Kernel, self_test, portable, cache_dir)


def self_test(kernel: Kernel) -> str:
    """"" when the kernel equals PyTorch on a small random matrix (dequantisation bit for bit,
    products within fp32 summation-order error); else what differed."""
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(72, 96, generator=g)
    packed, scales, global_scale = nvfp4.quantize(weights)
    blob = torch.empty(72, nvfp4.blob_width(96), dtype=torch.uint8)
    nvfp4.pack(packed, scales, blob)
    divisors = global_scale.expand(72) * (1 + torch.rand(72, generator=g))
    reference = nvfp4.dequantize(blob, divisors)
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        ours = kernel.dequantize(blob, divisors, dtype)
        if not torch.equal(ours.view(bits), reference.to(dtype).view(bits)):  # -0.0 too
            return f"dequantised {dtype} differs"
    x = torch.randn(11, 96, generator=g)
    expected = x.double() @ reference.double().T
    for y in (kernel.matmul(x, blob, divisors), kernel.matmul(x[:3], blob, divisors)):  # 2 tiles, 1
        error = ((y.double() - expected[: len(y)]).abs().max() / expected.abs().max()).item()
        if not error < 1e-5:
            return f"products off by {error:.1e} of their largest"
    return ""


@functools.cache
def kernel() -> Kernel | None:
    """The machine's kernel, loaded once per process (None: PyTorch serves NVFP4 on the CPU)."""
    return load()


def available() -> bool:
    return kernel() is not None

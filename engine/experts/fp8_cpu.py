"""FP8 experts on the CPU, read as shipped, through a small C kernel (fp8_cpu.c, built once per
machine by engine.native_build). PyTorch's CPU path converts FP8 to a wider type before any
matmul and reads the experts at ~0.3 GB/s; this reads the bytes once, decoding eight at a time
with AVX2, so the exact FP8 format can serve CPU misses too: when RAM is short and the experts
are served from the memory-mapped files, or when `--host-format fp8` keeps them exact.

`matmul` serves a few tokens (a decode step's); for many tokens (a prefill chunk's) `dequantize`
gives the matrix in bf16 for PyTorch's matmul, bit for bit as PyTorch's own conversion but ~10x
faster. `requantize_int8`
builds the int8 host copy at load (engine.experts.store.requantize_int8) bit for bit as PyTorch
does, several times faster. The library is
self-tested against PyTorch when first loaded; if it disagrees, or no compiler exists,
`available()` is False and callers keep the PyTorch path.
Glossary: M tokens, N output rows, K inputs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine import native_build
from engine.experts.cpu_rows import FLOAT, I64, INT, PTR, bind, check_inputs, spans
from engine.quant import FP8_DTYPE

SOURCE = Path(__file__).with_name("fp8_cpu.c")
# Tokens up to which `matmul` beats `dequantize` and PyTorch's matmul (measured per expert on 2
# cores at the real shapes: 8 against 26 ms at 8 tokens, 33 against 23 ms at 16).
MAX_MATMUL_TOKENS = 12


class Kernel:
    """The loaded library, with its function's signature declared."""

    VERSION = "cpu-kernel-2"  # in stored machine profiles' keys: a new kernel is measured again

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.simd = bool(lib.quire_fp8_simd())
        self._matmul = bind(lib, "quire_fp8_matmul", PTR, I64, I64, FLOAT, PTR, I64, PTR)
        self._dequantize = bind(lib, "quire_fp8_dequantize", PTR, I64, I64, FLOAT, PTR, INT)
        self._requantize = bind(lib, "quire_fp8_requantize_int8", PTR, I64, I64, PTR, I64, PTR)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """x [M, K] (any float dtype) @ (weight x scale)^T -> [M, N] fp32; weight FP8 [N, K] on
        the host with contiguous rows, scale one multiplier."""
        _check_host_rows(weight, FP8_DTYPE)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            raise ValueError(f"the FP8 CPU kernel takes one multiplier per matrix, not {scale.numel()}")
        n, k = weight.shape
        check_inputs(x, k)
        m = x.shape[0]
        xs = x.to(torch.float32).contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        raw = weight.view(torch.uint8)
        self._matmul(raw.data_ptr(), raw.stride(0), k, float(scale), xs.data_ptr(), m, y.data_ptr(),
                     n, *spans(n))
        return y


    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor | float,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """weight x scale [N, K] in bf16 or fp32, bit for bit PyTorch's
        (weight.to(float32) * scale).to(dtype) (engine.experts.compute.eager_dequantize)."""
        if dtype not in (torch.bfloat16, torch.float32):
            return self.dequantize(weight, scale, torch.float32).to(dtype)
        _check_host_rows(weight, FP8_DTYPE)
        n, k = weight.shape
        raw = weight.view(torch.uint8)
        out = torch.empty(n, k, dtype=dtype)
        as_bf16 = int(dtype == torch.bfloat16)
        self._dequantize(raw.data_ptr(), raw.stride(0), k, float(scale), out.data_ptr(), as_bf16,
                         n, *spans(n))
        return out

    def requantize_int8(self, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """FP8 [R, C] -> int8 codes written into `out` [R, C], bit for bit
        engine.experts.store.int8_codes; returns the rows' peaks [R] fp32."""
        _check_host_rows(weight, FP8_DTYPE)
        _check_host_rows(out, torch.int8)
        if out.shape != weight.shape:
            raise ValueError(f"int8 codes {tuple(out.shape)} for FP8 weights {tuple(weight.shape)}")
        n, k = weight.shape
        raw = weight.view(torch.uint8)
        peaks = torch.empty(n, dtype=torch.float32)
        self._requantize(raw.data_ptr(), raw.stride(0), k, out.data_ptr(), out.stride(0),
                         peaks.data_ptr(), n, *spans(n))
        return peaks


def _check_host_rows(t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.dim() != 2 or t.device.type != "cpu" or t.stride(1) != 1:
        what = "FP8" if dtype == FP8_DTYPE else "int8"
        raise ValueError(f"the FP8 CPU kernel takes host {what} [N, K] matrices with contiguous rows")


def load(portable: bool = False, cache_dir: Path | None = None) -> Kernel | None:
    """The kernel built for this machine and checked against PyTorch, or None (logged)."""
    return native_build.load_checked(SOURCE, Kernel, self_test, portable, cache_dir)


def every_byte_matrix(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """FP8 [n, k] of random bytes, NaNs (0x7F, 0xFF) excepted: every normal and subnormal value."""
    raw = torch.randint(0, 254, (n, k), dtype=torch.uint8, generator=gen)
    raw[raw >= 0x7F] += 1  # skip 0x7F; 0xFF is out of randint's range
    return raw.view(FP8_DTYPE)


def self_test(kernel: Kernel) -> str:
    """"" when the kernel's products equal PyTorch's within fp32 summation-order error on every
    byte value; else what differed."""
    g = torch.Generator().manual_seed(0)
    weight = every_byte_matrix(80, 100, g)  # K: 16-input steps, 8 inputs, then 4 one by one
    x = torch.randn(11, 100, generator=g)
    expected = x.double() @ weight.to(torch.float64).T * 0.75
    for y in (kernel.matmul(x, weight, 0.75), kernel.matmul(x[:3], weight, 0.75)):  # 2 tiles, 1
        error = ((y.double() - expected[: len(y)]).abs().max() / expected.abs().max()).item()
        if not error < 1e-5:
            return f"products off by {error:.1e} of their largest"
    reference = weight.to(torch.float32) * torch.tensor(0.75)
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        ours = kernel.dequantize(weight, 0.75, dtype)
        if not torch.equal(ours.view(bits), reference.to(dtype).view(bits)):
            return f"dequantised {dtype} differs"
    from engine.experts.store import int8_codes

    codes, peaks = int8_codes(weight.to(torch.float32))
    ours = torch.empty_like(codes)
    if not (torch.equal(kernel.requantize_int8(weight, ours), peaks) and torch.equal(ours, codes)):
        return "int8 requantisation differs"
    nan_row = weight.clone()
    nan_row.view(torch.uint8)[5, 7] = 0x7F
    if not kernel.matmul(x[:1], nan_row, 1.0)[0, 5].isnan():
        return "a NaN weight did not give a NaN"
    return ""


@functools.cache
def kernel() -> Kernel | None:
    """The machine's kernel, loaded once per process (None: PyTorch serves FP8 on the CPU)."""
    return load()


def available() -> bool:
    return kernel() is not None

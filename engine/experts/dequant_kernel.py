"""One Triton launch that dequantises a streamed expert matrix to bf16 for prefill's GEMMs,
bit for bit as the eager path (engine.experts.compute.dequant_expert) does it.

Why: during long prefill every streamed expert is dequantised before its cuBLAS GEMMs. The
eager path spends 3-10 launches per matrix and fp32 temporaries (up to ~450 MB of traffic and
64-200 MB of transient memory for one 4096x4096 matrix); this kernel reads the weights once and
writes bf16 once (48 MB for that matrix in FP8, 41 MB in int4).

Formats (as engine.experts.store ships them):
  - FP8 E4M3 [N, K] with one fp32 scale per expert: bf16(fp32(w) * s);
  - int8 [N, K] with fp32 scales per row [N]: bf16(fp32(w) * s[n]);
  - int4 blob uint8 [N, W] (layout in engine.experts.int4): bf16((code - 8) * scale + offset),
    the multiply and the add each rounded in fp32 (no FMA), with scale and offset bf16;
  - NVFP4 blob float4_e2m1fn_x2 [N, W] (layout in engine.experts.nvfp4) with fp32 divisors per
    row [N]: bf16(e2m1(code) * (e4m3(scale) / d[n])), the division an IEEE one (tl.div_rn: a
    plain `/` compiles to an approximate division) and the multiply each rounded in fp32, as
    nvfp4.dequantize does.

Exactness: every input converts to fp32 exactly (E4M3, int8, 4-bit codes, E2M1 and bf16 are
all fp32 subsets; NVFP4's codes and scales are decoded on their bits, see nvfp4_kernel), the
kernel then does the eager path's fp32 operations in its order (fusion off, so no FMA), and
rounds to bf16 ties-to-even on the bits with combine_kernel's _round_bf16 (NaN kept NaN,
overflow to inf as PyTorch does). The store's conversion of that already-bf16 value is exact,
truncating (the interpreter) or not (the GPU); the NVFP4 kernel stores the bits instead (tiny
steps give fp32 subnormals, which the interpreter's conversion gets wrong). Before first use
on a device the kernel is checked against the eager path on every format; a difference
disables it.

Tiling (memory bound): FP8/int8 programs take [BLOCK_N, BLOCK_K] tiles of K-contiguous rows
(BLOCK_K bytes in, 2 * BLOCK_K out per row, masked at ragged edges). int4 programs take one
64-row block of the code layout and GROUPS groups of 64 inputs: per group 2 KB of contiguous
code bytes [64 k, 32 j] and one (scale, offset) word per row, written (transposed) as rows
64b + j (low nibbles) and 64b + 32 + j (high nibbles), 128 contiguous bytes each. GROUPS is the
largest of 4, 3, 2, 1 that divides G (4 where K is a multiple of 256, as in the model), so
no program needs a mask. NVFP4 programs take BLOCK_N rows (masked at a ragged end) and GROUPS
groups of 16 inputs, each 8 contiguous code bytes and one scale byte a row: GROUPS is the
largest power of two up to NVFP4_GROUPS that divides G (32 in the model: 4 KB of codes in,
16 KB out), so no program needs a column mask.

Tests run a private copy of this module under Triton's interpreter on CPU tensors (see
tests/helpers/triton_interpreter.py); production never uses the interpreter. The interpreter
decodes E4M3's NaN as +-480, so the kernel marks it NaN itself (on a GPU, redundantly).
Glossary: N output rows, K inputs, W blob bytes per row, G groups (of 64 inputs for int4, of
16 for NVFP4) per row.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from engine.experts import combine_kernel, int4, nvfp4, nvfp4_kernel
from engine.experts.compute import eager_dequantize  # the reference (tests read it here too)
from engine.experts.fp8_kernel import ENABLE_FP_FUSION, TRITON_IMPORTED, usable_once
from engine.experts.storage import to_device
from engine.quant import FP8_DTYPE

log = logging.getLogger(__name__)

BLOCK_N, BLOCK_K = 16, 512  # FP8/int8 tile: 8 KB in, 16 KB out; 4096x4096 is 2048 programs
MAX_GROUPS = 4  # int4 groups per program: 8 KB of codes in, 32 KB out
NVFP4_GROUPS = 32  # NVFP4 groups per program at most (BLOCK_N rows): 4 KB of codes in, 16 KB out
NUM_WARPS = 4
_checked: dict[tuple[torch.device, str | None], bool] = {}

if TRITON_IMPORTED:  # decorating is cheap; tests also compile it for sm_90 without a GPU
    import triton
    import triton.language as tl

    # combine_kernel's helper, decorated again here: a kernel can only call jit functions of
    # its own kind, and in a test's interpreted copy of this module the imported one is a
    # compiled-mode JITFunction ("Cannot call @triton.jit'd outside of the scope of a kernel").
    # Re-decorating its Python function yields a JITFunction in production and an
    # InterpretedFunction in the copy, with one definition of the rounding.
    _round_bf16 = triton.jit(combine_kernel._round_bf16.fn)
    _e2m1 = triton.jit(nvfp4_kernel._e2m1.fn)  # likewise nvfp4_kernel's decoders
    _e4m3 = triton.jit(nvfp4_kernel._e4m3.fn)

    @triton.jit
    def _scaled_kernel(w_ptr, s_ptr, out_ptr, N, K, INT8: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """out = bf16(fp32(w) * s) on one [BLOCK_N, BLOCK_K] tile: int8 weights with a scale
        per row (INT8), or FP8 with one scale for the matrix."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        raw = tl.load(w_ptr + offs, mask=mask)  # masked lanes are never stored
        w = raw.to(tl.float32)
        if INT8:
            s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)[:, None]
        else:
            # E4M3's NaN (S.1111.111): the GPU converts it to NaN, the interpreter to +-480.
            w = tl.where((raw.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), w)
            s = tl.load(s_ptr)
        tl.store(out_ptr + offs, _round_bf16(w * s).to(tl.bfloat16), mask=mask)

    @triton.jit
    def _int4_value(code, pair):
        """bf16((code - 8) * scale + offset) in fp32; pair is the int32 word holding the bf16
        (scale, offset), little-endian: the scale in the low half, the offset in the high."""
        scale = (pair << 16).to(tl.float32, bitcast=True)
        offset = (pair & -65536).to(tl.float32, bitcast=True)
        return _round_bf16((code.to(tl.float32) - 8.0) * scale + offset)

    @triton.jit
    def _int4_kernel(w_ptr, pair_ptr, out_ptr, N, K, GROUPS: tl.constexpr, ROWS: tl.constexpr,
                     GROUP: tl.constexpr):
        """Rows ROWS * program_id(0) ..+ ROWS, groups GROUPS * program_id(1) ..+ GROUPS (the
        host picks GROUPS dividing G: no masks). w is the blob as bytes, pair the same memory
        as int32 words: code byte (b, k, j) at b*K*HALF + k*HALF + j, then words [G, N]."""
        HALF: tl.constexpr = ROWS // 2
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.arange(0, GROUP)
        offs_j = tl.arange(0, HALF)
        codes = w_ptr + b * K * HALF + offs_k[:, None] * HALF + offs_j[None, :]  # [GROUP, HALF]
        pairs = pair_ptr + N.to(tl.int64) * K // 8 + b * ROWS + offs_j  # [HALF], rows 64b + j
        out = out_ptr + (b * ROWS + offs_j)[:, None] * K + offs_k[None, :]  # [HALF, GROUP]
        for i in tl.static_range(GROUPS):
            g = tl.program_id(1) * GROUPS + i
            byte = tl.load(codes + g * (GROUP * HALF))
            lo = _int4_value(byte & 15, tl.load(pairs + g * N)[None, :])
            hi = _int4_value(byte >> 4, tl.load(pairs + g * N + HALF)[None, :])
            tl.store(out + g * GROUP, tl.trans(lo).to(tl.bfloat16))
            tl.store(out + HALF * K + g * GROUP, tl.trans(hi).to(tl.bfloat16))

    @triton.jit
    def _nvfp4_kernel(w_ptr, d_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr,
                      GROUPS: tl.constexpr, GROUP: tl.constexpr):
        """Rows BLOCK_N * program_id(0) ..+ BLOCK_N (masked at a ragged end), groups GROUPS *
        program_id(1) ..+ GROUPS (the host picks GROUPS dividing G: no column masks, which
        would narrow the loads): out = bf16(e2m1(code) * (e4m3(scale) / d[n])). w is the blob
        as bytes: row n's K/2 code bytes (the low nibble the even column), then its scales."""
        HALF: tl.constexpr = GROUP // 2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows[:, None] < N
        row_start = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
        groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        scale = _e4m3(tl.load(row_start + K // 2 + groups[None, :], mask=row_mask, other=0))
        d = tl.load(d_ptr + rows, mask=rows < N, other=1.0)[:, None]
        step = tl.div_rn(scale, tl.broadcast_to(d, (BLOCK_N, GROUPS)))[:, :, None]
        # a row's GROUPS * HALF code bytes as one contiguous run (wide loads), then per group
        codes = tl.program_id(1) * (GROUPS * HALF) + tl.arange(0, GROUPS * HALF)
        byte = tl.reshape(tl.load(row_start + codes[None, :], mask=row_mask),
                          (BLOCK_N, GROUPS, HALF))  # masked rows: never stored
        lo = _round_bf16(_e2m1(byte & 15) * step)
        hi = _round_bf16(_e2m1(byte >> 4) * step)
        out = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUPS * GROUP))  # pairs side by side: K order
        cols = tl.program_id(1) * (GROUPS * GROUP) + tl.arange(0, GROUPS * GROUP)
        # out is bf16 seen as int16: the rounded value's top half, stored as is (no float
        # conversion: the interpreter's turns fp32 subnormals, which small steps give, wrong).
        bits = (out.to(tl.uint32, bitcast=True) >> 16).to(tl.int16)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], bits, mask=row_mask)

    # As in int4_kernel: the imported fp8_kernel.INTERPRETED describes fp8_kernel's import, not
    # this module's; its kernels are interpreted exactly when they were decorated as such.
    INTERPRETED = not isinstance(_scaled_kernel, triton.runtime.JITFunction)
else:  # pragma: no cover - depends on the torch build
    INTERPRETED = False
KERNEL_AVAILABLE = TRITON_IMPORTED and (torch.cuda.is_available() or INTERPRETED)


def dequantize_bf16(weight: torch.Tensor, scale: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """weight [N, K] FP8 (scale: one value), int8 (scale [N]), an int4 blob uint8 [N, W]
    (scale ignored) or an NVFP4 blob float4_e2m1fn_x2 [N, W] (scale: its divisors [N]) ->
    bf16 [N, K] on weight's device, equal bit for bit to eager_dequantize (for NVFP4,
    nvfp4.dequantize); into `out` (bf16 [N, K], contiguous, same device) when given.
    Scales are converted to fp32 on weight's device as the eager path does. Refuses anything
    else with ValueError."""
    n, k = _check_weight(weight)
    out = _check_out(out, weight, n, k)
    if out.numel() == 0:
        return out
    # Triton launches on the current device's current stream, not on the tensors' device.
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
        if weight.dtype == torch.uint8:
            _launch_int4(weight, out, n, k)
        elif nvfp4.is_blob(weight):
            _launch_nvfp4(weight.view(torch.uint8), _check_scale(weight, scale, n), out, n, k)
        else:
            _launch_scaled(weight, _check_scale(weight, scale, n), out, n, k)
    return out


def _check_weight(weight: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a valid weight or blob."""
    if not (INTERPRETED or (KERNEL_AVAILABLE and weight.is_cuda)):
        raise ValueError(f"the dequantisation kernel needs Triton and a CUDA tensor, got one on "
                         f"{weight.device}")
    if weight.dtype not in (FP8_DTYPE, torch.int8, torch.uint8, nvfp4.BLOB_DTYPE) \
            or weight.dim() != 2:
        raise ValueError(f"dequantisation kernel takes [N, K] FP8 / int8 or int4 blobs (uint8) "
                         f"or NVFP4 blobs, got {tuple(weight.shape)} {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("dequantisation kernel needs a contiguous weight")
    if nvfp4.is_blob(weight):
        return nvfp4.matrix_shape(weight)  # ValueError for a width no blob has
    if weight.dtype != torch.uint8:
        return weight.shape[0], weight.shape[1]
    n, k = int4.matrix_shape(weight)  # ValueError for a width no blob has
    if not int4.supports(n, k):
        raise ValueError(f"an int4 blob of {n}x{k}: rows must be a multiple of {int4.ROW_BLOCK} "
                         f"and inputs of {int4.GROUP}")
    if weight.data_ptr() % 4:  # the (scale, offset) pairs are read as int32 words
        raise ValueError("dequantisation kernel needs int4 blobs at 4-byte aligned addresses")
    return n, k


def _check_scale(weight: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """The scale as the kernel reads it: fp32, contiguous, on weight's device."""
    if weight.dtype == torch.int8 and tuple(scale.shape) != (n,):
        raise ValueError(f"int8 weights of {n} rows need scales [{n}], got {tuple(scale.shape)}")
    if nvfp4.is_blob(weight) and tuple(scale.shape) != (n,):
        raise ValueError(f"NVFP4 blobs of {n} rows need divisors [{n}], got {tuple(scale.shape)}")
    if weight.dtype == FP8_DTYPE and scale.numel() != 1:
        raise ValueError(f"FP8 weights need one scale, got {tuple(scale.shape)}")
    if not scale.is_floating_point():
        raise ValueError(f"scales must be floating point, got {scale.dtype}")
    return scale.to(device=weight.device, dtype=torch.float32).reshape(-1).contiguous()


def _check_out(out: torch.Tensor | None, weight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if out is None:
        return torch.empty((n, k), dtype=torch.bfloat16, device=weight.device)
    if out.dtype != torch.bfloat16 or tuple(out.shape) != (n, k) or out.device != weight.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous bf16 [{n}, {k}] on {weight.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def _launch_scaled(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, n: int,
                   k: int) -> None:
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    _scaled_kernel[grid](weight, scale, out, n, k, INT8=weight.dtype == torch.int8,
                         BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
                         enable_fp_fusion=ENABLE_FP_FUSION)


def groups_per_program(k: int) -> int:
    """The most groups, up to MAX_GROUPS, that divides a row's G = K / 64 groups."""
    return next(g for g in range(MAX_GROUPS, 0, -1) if (k // int4.GROUP) % g == 0)


def _launch_int4(blob: torch.Tensor, out: torch.Tensor, n: int, k: int) -> None:
    groups = groups_per_program(k)
    grid = (n // int4.ROW_BLOCK, k // int4.GROUP // groups)
    _int4_kernel[grid](blob, blob.view(torch.int32), out, n, k, GROUPS=groups,
                       ROWS=int4.ROW_BLOCK, GROUP=int4.GROUP, num_warps=NUM_WARPS,
                       enable_fp_fusion=ENABLE_FP_FUSION)


def _launch_nvfp4(blob: torch.Tensor, divisors: torch.Tensor, out: torch.Tensor, n: int,
                  k: int) -> None:
    groups = nvfp4_kernel.groups_per_step(k, NVFP4_GROUPS)
    grid = (triton.cdiv(n, BLOCK_N), k // nvfp4.GROUP // groups)
    _nvfp4_kernel[grid](blob, divisors, out.view(torch.int16), n, k, blob.stride(0),
                        BLOCK_N=BLOCK_N, GROUPS=groups, GROUP=nvfp4.GROUP, num_warps=NUM_WARPS,
                        enable_fp_fusion=ENABLE_FP_FUSION)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN matches any NaN (their payloads may differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


def kernel_usable(device: torch.device, fmt: str | None = None) -> bool:
    """True once dequantize_bf16 has matched the eager path bit for bit on `device` for `fmt`
    ("fp8", "int8", "int4" or "nvfp4"; None: all four), checked once per device and format: a
    GPU whose Triton has no E4M3 (before sm_89) keeps the kernel for int8, int4 and nvfp4
    (whose scales are decoded on their bits). False off CUDA, without Triton, under the
    interpreter."""
    device = _device_key(device)
    return usable_once(_checked, device, fmt, INTERPRETED, lambda: _self_test(device, fmt))


def _device_key(device: torch.device) -> torch.device:
    """"cuda" and "cuda:N" (the current one) are one device for the verdicts."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def disable(device: torch.device, fmt: str, why: Exception) -> None:
    """Stop using the kernel for `fmt` on `device` after a failure on a real call (the eager
    path serves from then on): a kernel problem costs speed, never an answer."""
    device = _device_key(device)
    log.warning("dequantisation kernel failed on %s (%s, %s): using the eager path", device, fmt, why)
    _checked[device, fmt] = False


def random_int4_blob(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A random blob uint8 [N, W] on the CPU: every code, (scale, offset) pairs of mixed size
    and sign, built as bytes (no quantising)."""
    codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen)
    size = 2.0 ** torch.randint(-20, 10, (k // int4.GROUP, n, 2), generator=gen)
    pairs = (torch.randn(k // int4.GROUP, n, 2, generator=gen) * size).to(torch.bfloat16)
    return torch.cat([codes, pairs.view(torch.uint8).reshape(-1)]).view(n, -1)


def random_nvfp4_blob(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random NVFP4 blob float4_e2m1fn_x2 [N, W] and its divisors fp32 [N] on the CPU, built
    as bytes: every code, every E4M3 scale byte (NaN, -0, negatives, subnormals, +-448) in
    random places, divisors of mixed size; the first seven make steps that round to bf16 ties
    down (1 + 2^-8) and up (1 + 3 * 2^-8) from power-of-two scales, infinite ones (0), negative
    ones, subnormal products, products that overflow fp32 and ones that overflow only bf16."""
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.randperm(n * k // nvfp4.GROUP, generator=gen) % 256
    divisors = torch.rand(n, generator=gen) * 2.0 ** torch.randint(-12, 12, (n,), generator=gen)
    blob = torch.cat([codes, scales.to(torch.uint8).view(n, -1)], dim=1).view(nvfp4.BLOB_DTYPE)
    special = torch.tensor([256 / 257, 256 / 259, 0.0, -0.37, 3e38, 2e-36])[:n]
    divisors[:len(special)] = special
    if n > len(special):  # the row's largest value to 3.4e38: above bf16's largest, not fp32's
        top = nvfp4.dequantize(blob[len(special)][None], torch.ones(1)).nan_to_num(0).abs().max()
        divisors[len(special)] = top / 3.4e38
    return blob, divisors


def self_test_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, scale) on the CPU per format: ragged tile edges, every FP8 and int8 value
    (NaN, -0, +-448, subnormals), scales that make the products round, int4 blobs of both
    kinds of program (GROUPS 4 and 1), an NVFP4 blob with every code and scale byte and the
    hard divisors of random_nvfp4_blob, rows ending mid-block."""
    gen = torch.Generator().manual_seed(0)
    fp8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(100 * 1100 // 256 + 1)
    fp8 = fp8[torch.randperm(fp8.numel(), generator=gen)][:100 * 1100].view(FP8_DTYPE)
    int8 = torch.randint(-128, 128, (100, 700), dtype=torch.int8, generator=gen)
    row_scales = torch.rand(100, generator=gen) * 2.0 ** torch.randint(-12, 4, (100,),
                                                                        generator=gen)
    return {"fp8": (fp8.view(100, 1100), torch.tensor(0.37)),
            "int8": (int8, row_scales),
            "int4 (4 groups a program)": (random_int4_blob(128, 512, gen), torch.empty(0)),
            "int4 (1 group a program)": (random_int4_blob(64, 320, gen), torch.empty(0)),
            "nvfp4": random_nvfp4_blob(40, 16 * 40, gen)}


def _self_test(device: torch.device, fmt: str | None = None) -> bool:
    try:
        for name, (weight, scale) in self_test_cases().items():
            if fmt is not None and not name.startswith(fmt):
                continue
            weight, scale = to_device(weight, device), scale.to(device)
            if not same_bits(dequantize_bf16(weight, scale), eager_dequantize(weight, scale)):
                log.warning("dequantisation kernel differs from the eager path on %s (%s): "
                            "disabled", device, name)
                return False
        return True
    except Exception as exc:  # a compiler or driver problem: fall back to the eager path
        log.warning("dequantisation kernel unavailable on %s (%s): using the eager path", device,
                    exc)
        return False

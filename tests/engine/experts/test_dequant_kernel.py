"""The prefill dequantisation kernel (engine/experts/dequant_kernel.py) without a GPU.

As in test_combine_kernel: a private copy of the module runs its kernels under Triton's
interpreter on CPU tensors, and the production kernels are compiled for sm_90. The kernel does
the eager path's fp32 operations and rounds to bf16 on the bits, so its results must equal the
eager path's bit for bit (no tolerance; NaN matches NaN).
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.experts import dequant_kernel, int4, nvfp4
from engine.experts.compute import dequant_expert
from engine.quant import FP8_DTYPE
from tests.helpers.triton_interpreter import (
    QUIET_INTERPRETER,
    interpreted_kernels,
)

try:  # for the deliberately wrong rounding below; the tests that need Triton skip without it
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    tl = None

# The interpreter computes with numpy, which warns where the overflow tests overflow on purpose
# (and where NVFP4's zero divisors divide by zero, and multiply the infinite steps by zero).
pytestmark = [QUIET_INTERPRETER,
              pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
same_bits = dequant_kernel.same_bits
NO_SCALE = torch.empty(0)


kernels = interpreted_kernels(dequant_kernel)  # a private copy whose kernels run under the interpreter


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def every_fp8(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """FP8 [N, K] holding every E4M3 encoding (NaN, -0, +-448, subnormals) in random places."""
    codes = torch.arange(n * k, dtype=torch.int64) % 256
    codes = codes[torch.randperm(n * k, generator=gen(seed))].to(torch.uint8)
    return codes.view(FP8_DTYPE).view(n, k)


def every_int8(n: int, k: int, seed: int = 0) -> torch.Tensor:
    codes = torch.arange(n * k, dtype=torch.int64) % 256 - 128  # -128 .. 127, each many times
    return codes[torch.randperm(n * k, generator=gen(seed))].to(torch.int8).view(n, k)


def row_scales(n: int, seed: int = 0) -> torch.Tensor:
    """[N] fp32 of mixed size, with exact ties for the rounding (1 + 2^-8 rounds down to even,
    1 + 3 * 2^-8 up), zero, a negative scale and one that overflows bf16 and fp32."""
    s = torch.rand(n, generator=gen(seed)) * 2.0 ** torch.randint(-12, 6, (n,), generator=gen(seed))
    s[:5] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 0.0, -0.37, 3e36])
    return s


def quantised_blob(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """An int4 blob as the store writes it, with some constant groups (scale 0, codes 8)."""
    w = torch.randn(n, k, generator=gen(seed)) * 0.02
    w[: n // 2, : int4.GROUP] = 0.125  # a constant group in every row of the first half
    w[3, -int4.GROUP:] = -7.0
    return int4.quantize(w)


def check(kernels, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's result, asserted equal to the eager path's bit for bit."""
    ours = kernels.dequantize_bf16(weight, scale)
    expected = dequant_kernel.eager_dequantize(weight, scale)
    assert ours.dtype == torch.bfloat16 and ours.shape == expected.shape
    assert same_bits(ours, expected), int((ours.float() != expected.float()).sum())
    return ours


def test_the_reference_is_what_compute_dequantises():
    """eager_dequantize, which the kernel is held to, is dequant_expert's bf16 path."""
    cases = [(every_fp8(64, 96), torch.tensor(0.37)), (every_int8(64, 96), row_scales(64)),
             (quantised_blob(64, 128), NO_SCALE), dequant_kernel.random_nvfp4_blob(24, 96, gen())]
    for weight, scale in cases:
        ours = dequant_kernel.eager_dequantize(weight, scale)
        assert same_bits(ours, dequant_expert(weight, scale, weight, scale, torch.bfloat16)[0])


@pytest.mark.parametrize("scale", [torch.tensor(1.0), torch.tensor([0.37]), torch.tensor(0.00166),
                                   torch.tensor(0.1, dtype=torch.float64), torch.tensor(-3.0),
                                   torch.tensor(1e36)],
                         ids=["one", "1-element", "small", "fp64", "negative", "overflowing"])
def test_fp8_equals_the_eager_path_bit_for_bit(kernels, scale):
    ours = check(kernels, every_fp8(128, 192), scale)
    assert ours.isnan().sum() == 2 * 128 * 192 // 256  # both E4M3 NaNs stay NaN


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_ragged_tiles(kernels, monkeypatch, fmt):
    """Edges in both dimensions and several programs each way (tiles shrunk to 16 x 128)."""
    monkeypatch.setattr(kernels, "BLOCK_K", 128)
    n, k = 77, 300
    if fmt == "fp8":
        check(kernels, every_fp8(n, k, seed=1), torch.tensor(0.0123))
    else:
        check(kernels, every_int8(n, k, seed=1), row_scales(n, seed=1))


def test_int8_equals_the_eager_path_bit_for_bit(kernels):
    ours = check(kernels, every_int8(128, 192), row_scales(128))
    assert ours[4].isinf().any() and not ours.isnan().any()  # the overflowing row: +-inf


@pytest.mark.parametrize("shape", [(128, 128), (64, 192), (128, 256), (64, 512)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_equals_the_eager_path_bit_for_bit(kernels, shape):
    """Random blobs (every code, pairs of mixed size and sign) and quantised ones (constant
    groups), with 2, 3, 4 and 4 groups a program (the last in two programs per row block)."""
    check(kernels, dequant_kernel.random_int4_blob(*shape, gen(2)), NO_SCALE)
    ours = check(kernels, quantised_blob(*shape), torch.ones(3))  # the scale is ignored
    assert torch.equal(ours[0, : int4.GROUP], torch.full((int4.GROUP,), 0.125).bfloat16())


def test_int4_blob_inside_a_staging_buffer(kernels):
    """A blob that is the second slot of a buffer: the kernel must read from its own start."""
    first, second = quantised_blob(64, 192, seed=1), quantised_blob(64, 192, seed=2)
    check(kernels, torch.stack([first, second])[1], NO_SCALE)


def test_each_int4_code_and_pair_lands_in_its_row_and_column(kernels):
    """Change one nibble or one (scale, offset) pair and exactly the weights it encodes change:
    a wrong row, half, column or group mapping fails here."""
    n, k = 128, 192
    blob = dequant_kernel.random_int4_blob(n, k, gen(3))
    pairs = int4.split(blob)[1]  # scales in [0.5, 1], offsets +-[0.5, 1]: every change shows
    pairs[..., 0] = torch.rand(pairs.shape[:2], generator=gen(4)) * 0.5 + 0.5
    pairs[..., 1] = (torch.rand(pairs.shape[:2], generator=gen(5)) * 0.5 + 0.5) * \
        torch.randint(0, 2, pairs.shape[:2], generator=gen(6)).mul(2).sub(1)
    base = check(kernels, blob, NO_SCALE)
    b, kk, j = 1, 130, 5  # byte (b, k, j): rows 64b + j (low nibble) and 64b + 32 + j (high)
    for row, flip in ((64 * b + j, 0x0F), (64 * b + 32 + j, 0xF0)):
        changed = blob.clone()
        int4.split(changed)[0].reshape(-1)[(b * k + kk) * 32 + j] ^= flip
        assert torch.nonzero(check(kernels, changed, NO_SCALE) != base).tolist() == [[row, kk]]
    for half in (0, 1):  # scale, offset of group 2 of row 70
        changed = blob.clone()
        int4.split(changed)[1][2, 70, half] *= 1.5
        diff = torch.nonzero(check(kernels, changed, NO_SCALE) != base)
        assert set(diff[:, 0].tolist()) == {70} and set(diff[:, 1].tolist()) <= set(range(128, 192))


def check_nvfp4(kernels, blob: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    """The kernel's result, asserted equal bit for bit to nvfp4.dequantize's in bf16."""
    ours = kernels.dequantize_bf16(blob, divisors)
    expected = nvfp4.dequantize(blob, divisors, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.shape == expected.shape
    assert same_bits(ours, expected), int((ours.float() != expected.float()).sum())
    return ours


def test_every_nvfp4_code_and_scale_byte_decodes_exactly(kernels):
    """With divisors 1 every weight is e2m1 x e4m3 exactly (at most 6 significant bits): all
    16 codes against all 256 scale bytes (NaN, -0, subnormals, +-448), checked against the
    formats' tables, not against nvfp4.dequantize."""
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).repeat(16, 16)  # each group: codes 0..15
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    blob = torch.cat([packed, scales], dim=1).view(nvfp4.BLOB_DTYPE)
    ours = kernels.dequantize_bf16(blob, torch.ones(16))
    values = torch.tensor(nvfp4.E2M1_VALUES).repeat(16, 16).view(16, 16, 16)
    expected = (values * scales.view(FP8_DTYPE).float()[..., None]).view(16, 256)
    assert same_bits(ours, expected.bfloat16())
    assert ours.isnan().sum() == 2 * 16 and (ours.view(torch.int16) == -32768).any()  # -0.0


@pytest.mark.parametrize("shape", [(40, 640), (16, 512), (64, 1024), (3, 48), (17, 96)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_nvfp4_equals_the_eager_path_bit_for_bit(kernels, shape):
    """Every code and scale byte, divisors of mixed size: 8, 32, 32 (two programs a row),
    1 and 2 groups a program, rows ending mid-block."""
    blob, divisors = dequant_kernel.random_nvfp4_blob(*shape, gen(7))
    check_nvfp4(kernels, blob, divisors)


def test_nvfp4_covers_ties_overflow_and_subnormals(kernels):
    """The self-test's blob reaches every hard case of the rounding: values (in fp32, before
    rounding) exactly halfway between two bf16s with an even and with an odd lower neighbour,
    NaN, +-inf, fp32 subnormals, and values that overflow only in bf16."""
    blob, divisors = dequant_kernel.self_test_cases()["nvfp4"]
    exact = nvfp4.dequantize(blob, divisors)  # fp32
    bits = exact.view(torch.int32)
    halfway = (bits & 0xFFFF) == 0x8000
    assert (halfway & (bits & 0x10000 == 0)).any() and (halfway & (bits & 0x10000 != 0)).any()
    assert exact.isnan().any() and exact.isposinf().any() and exact.isneginf().any()
    assert ((exact != 0) & (exact.abs() < torch.finfo(torch.float32).tiny)).any()
    assert (exact.isfinite() & exact.bfloat16().isinf()).any()
    ours = check_nvfp4(kernels, blob, divisors)
    assert ours.isinf().any() and ours.isnan().any()


def test_nvfp4_ragged_programs(kernels, monkeypatch):
    """Several programs each way at small tiles: 16-row blocks, at most 4 groups a program."""
    monkeypatch.setattr(kernels, "NVFP4_GROUPS", 4)
    for shape in ((77, 192), (33, 80)):  # 12 groups (4 a program), 5 groups (1 a program)
        check_nvfp4(kernels, *dequant_kernel.random_nvfp4_blob(*shape, gen(8)))


def test_nvfp4_blob_inside_a_staging_buffer(kernels):
    """A blob that is the second slot of a buffer, at an odd offset: reads from its own start."""
    first, divisors = dequant_kernel.random_nvfp4_blob(24, 160, gen(9))
    second, _ = dequant_kernel.random_nvfp4_blob(24, 160, gen(10))
    buffer = torch.zeros(1 + 2 * first.numel(), dtype=torch.uint8)
    buffer[1:].view(2, *first.shape).copy_(torch.stack([first, second]).view(torch.uint8))
    check_nvfp4(kernels, buffer[1 + first.numel():].view(first.shape).view(nvfp4.BLOB_DTYPE),
                divisors)


def test_a_wrong_scale_or_rounding_is_caught(kernels, monkeypatch):
    """The comparisons can fail: a scale 1% off, row scales of the wrong rows, and rounding by
    truncation (which the interpreter's own bf16 conversion does) all differ from eager."""
    weight, scale = every_fp8(128, 192), torch.tensor(0.37)
    expected = dequant_kernel.eager_dequantize(weight, scale)
    assert not same_bits(kernels.dequantize_bf16(weight, scale * 1.01), expected)
    w8, s8 = every_int8(128, 192), row_scales(128)
    assert not same_bits(kernels.dequantize_bf16(w8, s8.roll(1)),
                         dequant_kernel.eager_dequantize(w8, s8))
    fp4, divisors = dequant_kernel.random_nvfp4_blob(64, 192, gen(4))
    assert not same_bits(kernels.dequantize_bf16(fp4, divisors.roll(1)),
                         dequant_kernel.eager_dequantize(fp4, divisors))
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(kernels, "_round_bf16", InterpretedFunction(_truncate_bf16))
    blob = dequant_kernel.random_int4_blob(64, 192, gen(4))
    for w, s in ((weight, scale), (w8, s8), (blob, NO_SCALE), (fp4, divisors)):
        assert not same_bits(kernels.dequantize_bf16(w, s), dequant_kernel.eager_dequantize(w, s))


def _truncate_bf16(x):
    """A wrong _round_bf16: toward zero."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)


def test_out_is_filled_and_returned(kernels):
    cases = [(every_fp8(64, 96), torch.tensor(0.5)), (every_int8(64, 96), row_scales(64)),
             (quantised_blob(64, 128), NO_SCALE), dequant_kernel.random_nvfp4_blob(24, 96, gen())]
    for weight, scale in cases:
        shape = dequant_kernel.eager_dequantize(weight, scale).shape
        out = torch.full(shape, 7.0, dtype=torch.bfloat16)
        assert kernels.dequantize_bf16(weight, scale, out=out) is out
        assert same_bits(out, dequant_kernel.eager_dequantize(weight, scale))


def test_bad_calls_are_refused(kernels):
    fp8, int8, blob = every_fp8(64, 128), every_int8(64, 128), quantised_blob(64, 128)
    deq = kernels.dequantize_bf16
    bad = [(fp8.to(torch.bfloat16), NO_SCALE, "FP8 / int8 or int4"),
           (fp8.view(torch.uint8).view(torch.float8_e5m2), torch.tensor(1.0), "FP8 / int8 or int4"),
           (fp8[0], torch.tensor(1.0), "FP8 / int8 or int4"),
           (fp8[None], torch.tensor(1.0), "FP8 / int8 or int4"),
           (fp8.t(), torch.tensor(1.0), "contiguous"), (fp8, torch.ones(2), "one scale"),
           (int8, torch.ones(63), r"scales \[64\]"), (int8, torch.ones(64, 1), r"scales \[64\]"),
           (int8, torch.ones(64, dtype=torch.int32), "floating point"),
           (blob[:, :-4].contiguous(), NO_SCALE, "not an int4 blob width"),
           (int4.quantize(torch.randn(128, 128))[:32], NO_SCALE, "multiple of 64")]
    for weight, scale, message in bad:
        with pytest.raises(ValueError, match=message):
            deq(weight, scale)
    unaligned = torch.zeros(blob.numel() + 2, dtype=torch.uint8)[2:].view(blob.shape)
    with pytest.raises(ValueError, match="4-byte aligned"):
        deq(unaligned, NO_SCALE)
    fp4, divisors = dequant_kernel.random_nvfp4_blob(32, 64, gen())
    fp4_bad = [(fp4, divisors[:-1], r"NVFP4 blobs of 32 rows need divisors \[32\]"),
               (fp4, divisors[None], r"divisors \[32\]"),
               (fp4, divisors.to(torch.int32), "floating point"),
               (fp4.view(torch.uint8)[:, :-1].contiguous().view(nvfp4.BLOB_DTYPE), divisors,
                "not an NVFP4 blob width"),
               (fp4[None], divisors, "or NVFP4 blobs"),
               (fp4.view(torch.uint8).t().contiguous().t().view(nvfp4.BLOB_DTYPE), divisors,
                "contiguous")]
    for weight, scale, message in fp4_bad:
        with pytest.raises(ValueError, match=message):
            deq(weight, scale)
    for out in (torch.empty(64, 128), torch.empty(64, 127, dtype=torch.bfloat16),
                torch.empty(128, 64, dtype=torch.bfloat16).t()):
        with pytest.raises(ValueError, match="out must be"):
            deq(fp8, torch.tensor(1.0), out=out)
    with pytest.raises(ValueError, match="CUDA tensor"):  # production code never runs on the CPU
        dequant_kernel.dequantize_bf16(fp8, torch.tensor(1.0))


def test_production_never_uses_the_interpreter(kernels):
    assert not dequant_kernel.INTERPRETED
    for module in (dequant_kernel, kernels):
        assert not module.kernel_usable(torch.device("cpu"))
    # Even given a GPU, an interpreted build must not serve: it is numpy, far too slow.
    assert not kernels.kernel_usable(torch.device("cuda", 0))


def test_self_test_passes_and_catches_a_broken_kernel(kernels, monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert kernels._self_test(cpu)
    deq = kernels.dequantize_bf16
    formats = {"fp8": FP8_DTYPE, "int8": torch.int8, "int4": torch.uint8,
               "nvfp4": nvfp4.BLOB_DTYPE}
    for fmt, dtype in formats.items():
        def broken(weight, scale, out=None, dtype=dtype):  # one weight nudged by one bf16 step
            result = deq(weight, scale, out)
            if weight.dtype == dtype:
                first = int(torch.nonzero(~result.isnan().view(-1))[0])  # NaN + 1 bit is NaN
                result.view(torch.int16).view(-1)[first] += 1
            return result

        monkeypatch.setattr(kernels, "dequantize_bf16", broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert not kernels._self_test(cpu)
            assert not kernels._self_test(cpu, fmt)
        assert f"differs from the eager path on cpu ({fmt}" in caplog.text
        # Per format: the others still pass (a GPU without E4M3 keeps int8, int4 and nvfp4).
        assert all(kernels._self_test(cpu, other) for other in formats if other != fmt)
    monkeypatch.setattr(kernels, "dequantize_bf16", lambda *args, **kwargs: 1 / 0)
    with caplog.at_level(logging.WARNING):
        assert not kernels._self_test(cpu)
    assert "dequantisation kernel unavailable" in caplog.text


def test_the_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """The production kernels through Triton's whole pipeline to sm_90 cubins, with the 16-byte
    divisibility Triton infers at launch: wide loads and stores, no FMA (which would change
    int4's two roundings into one) and no flushing of subnormals (PyTorch keeps them)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    dk = dequant_kernel
    tiles = {"BLOCK_N": dk.BLOCK_N, "BLOCK_K": dk.BLOCK_K}
    variants = [  # (kernel, weight pointer type, constants)
        (dk._scaled_kernel, "*fp8e4nv", {"INT8": False, **tiles}),
        (dk._scaled_kernel, "*i8", {"INT8": True, **tiles}),
        *((dk._int4_kernel, "*u8", {"GROUPS": groups, "ROWS": int4.ROW_BLOCK, "GROUP": int4.GROUP})
          for groups in (dk.MAX_GROUPS, 1))]
    for kernel, w_type, constants in variants:
        names = kernel.arg_names[:5]
        signature = dict(zip(names, [w_type, "*i32" if kernel is dk._int4_kernel else "*fp32",
                                     "*bf16", "i32", "i32"], strict=True))
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}
        source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")},
                           constants, aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": dk.NUM_WARPS, "enable_fp_fusion": dk.ENABLE_FP_FUSION})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and "mul.rn.f32" in ptx
        assert "fma" not in ptx and ".ftz" not in ptx
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, constants


def test_the_nvfp4_kernel_compiles_for_hopper(monkeypatch, tmp_path):
    """As above for the NVFP4 kernel, at the model's 32 groups a program and at 1: its
    division an IEEE one (div.rn, not the approximate div.full a plain `/` gives), wide loads
    of the codes and wide stores."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    dk = dequant_kernel
    signature = dict(zip(dk._nvfp4_kernel.arg_names[:6],
                         ["*u8", "*fp32", "*i16", "i32", "i32", "i32"], strict=True))
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    for groups in (dk.NVFP4_GROUPS, 1):
        constants = {"BLOCK_N": dk.BLOCK_N, "GROUPS": groups, "GROUP": nvfp4.GROUP}
        source = ASTSource(dk._nvfp4_kernel, {**signature, **dict.fromkeys(constants, "constexpr")},
                           constants, aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": dk.NUM_WARPS, "enable_fp_fusion": dk.ENABLE_FP_FUSION})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and "div.rn.f32" in ptx and "mul.rn.f32" in ptx
        assert "div.full" not in ptx and "div.approx" not in ptx and "rcp" not in ptx
        assert "fma" not in ptx and ".ftz" not in ptx
        if groups > 1:
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx


@pytest.mark.cuda
def test_the_gpu_kernel_equals_the_eager_path_at_the_model_shapes():
    device = torch.device("cuda", 0)
    assert dequant_kernel.kernel_usable(device)
    cases = [(every_fp8(4096, 4096), torch.tensor(0.0123)),
             (every_int8(4096, 2048), row_scales(4096)),
             (dequant_kernel.random_int4_blob(4096, 4096, gen(5)), NO_SCALE),
             (quantised_blob(4096, 2048), NO_SCALE)]
    for weight, scale in cases:
        weight, scale = weight.to(device), scale.to(device)
        expected = dequant_kernel.eager_dequantize(weight, scale)
        assert same_bits(dequant_kernel.dequantize_bf16(weight, scale), expected)
        out = torch.empty_like(expected)
        assert dequant_kernel.dequantize_bf16(weight, scale, out=out) is out
        assert same_bits(out, expected)


@pytest.mark.cuda
def test_the_gpu_nvfp4_kernel_equals_the_eager_path_at_the_model_shapes():
    """The GPU's IEEE division and rounding, subnormals kept: as PyTorch's on the same GPU."""
    device = torch.device("cuda", 0)
    assert dequant_kernel.kernel_usable(device, "nvfp4")
    for shape, seed in (((4096, 4096), 11), ((4096, 2048), 12), ((1000, 720), 13)):
        blob, divisors = (t.to(device) for t in dequant_kernel.random_nvfp4_blob(*shape, gen(seed)))
        expected = nvfp4.dequantize(blob, divisors, torch.bfloat16)
        assert same_bits(dequant_kernel.dequantize_bf16(blob, divisors), expected)
        out = torch.empty_like(expected)
        assert dequant_kernel.dequantize_bf16(blob, divisors, out=out) is out
        assert same_bits(out, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_dequantisation_uses_the_kernel_on_a_gpu(monkeypatch):
    """engine.experts.compute.dequant_expert (what streamed prefill and the slots call) takes
    the fused launch in bf16 on a GPU, and gives the eager bits."""
    calls = []
    real = dequant_kernel.dequantize_bf16
    monkeypatch.setattr(dequant_kernel, "dequantize_bf16", lambda w, s: calls.append(w.dtype) or real(w, s))
    gen = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(256, 128, generator=gen) * 30).to(torch.float8_e4m3fn).cuda()
    down = (torch.randn(128, 128, generator=gen) * 30).to(torch.float8_e4m3fn).cuda()
    scale = torch.tensor(0.01, device="cuda")
    ours = dequant_expert(gate_up, scale, down, scale, torch.bfloat16)
    assert calls == [torch.float8_e4m3fn] * 2
    for got, w in zip(ours, (gate_up, down), strict=True):
        assert dequant_kernel.same_bits(got, dequant_kernel.eager_dequantize(w, scale))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_kernel_failure_on_a_real_call_falls_back_and_disables_it(monkeypatch, caplog):
    gen = torch.Generator().manual_seed(4)
    weight = (torch.randn(128, 128, generator=gen) * 30).to(torch.float8_e4m3fn).cuda()
    scale = torch.tensor(0.01, device="cuda")
    assert dequant_kernel.kernel_usable(weight.device, "fp8")

    def broken(*args, **kwargs):
        raise RuntimeError("a compile failure at a new shape (simulated)")

    monkeypatch.setattr(dequant_kernel, "dequantize_bf16", broken)
    monkeypatch.setattr(dequant_kernel, "_checked", dict(dequant_kernel._checked))
    with caplog.at_level(logging.WARNING):
        ours, _ = dequant_expert(weight, scale, weight, scale, torch.bfloat16)
    assert same_bits(ours, dequant_kernel.eager_dequantize(weight, scale))
    assert "dequantisation kernel failed" in caplog.text
    assert not dequant_kernel.kernel_usable(weight.device, "fp8")

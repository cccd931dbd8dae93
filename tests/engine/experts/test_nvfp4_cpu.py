"""The NVFP4 CPU kernel (engine/experts/nvfp4_cpu.c, built by engine.native_build) against
PyTorch's reading of the format (engine.experts.nvfp4.dequantize): dequantisation bit for bit,
products within fp32 summation-order error, in its vector (AVX2) and portable builds; and the
PyTorch path that serves when no compiler exists or a build fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine import native_build
from engine.experts import compute, dequant_kernel, nvfp4, nvfp4_cpu
from tests.helpers.cpu_features import built_kernel

# Rows split over three threads (spans of uneven length), whatever the machine's count.
pytestmark = pytest.mark.usefixtures("three_cpu_threads")

needs_compiler = pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler on this machine")
same_bits = dequant_kernel.same_bits  # NaN matches NaN; -0.0 does not match 0.0
PRODUCT_RTOL = 1e-5  # of the largest product: fp32 sums in another order, over K <= 1,000 inputs


def _blob(n: int, k: int, seed: int = 0, row_stride: int | None = None):
    """(blob [n, W] uint8 whose rows may sit `row_stride` bytes apart, per-row divisors [n])."""
    g = torch.Generator().manual_seed(seed)
    packed, scales, global_scale = nvfp4.quantize(torch.randn(n, k, generator=g))
    width = nvfp4.blob_width(k)
    blob = torch.zeros(n, row_stride or width, dtype=torch.uint8)[:, :width]
    nvfp4.pack(packed, scales, blob)
    return blob.view(nvfp4.BLOB_DTYPE), global_scale * (0.5 + torch.rand(n, generator=g))


@pytest.fixture(scope="module", params=["native", "portable"])
def kernel(request, tmp_path_factory) -> nvfp4_cpu.Kernel:
    return built_kernel(nvfp4_cpu, request.param, tmp_path_factory.mktemp("kernels"))


# K: 3 groups (the vector loop's odd tail), 64; N: one row, rows that do not split evenly over
# threads, and enough rows (>= 64 per thread) that the work is split.
@pytest.mark.parametrize(("n", "k"), [(1, 48), (37, 64), (300, 96), (520, 208)])
def test_dequantisation_equals_pytorch_bit_for_bit(kernel, n, k):
    blob, divisors = _blob(n, k, seed=n)
    reference = nvfp4.dequantize(blob, divisors)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert same_bits(kernel.dequantize(blob, divisors, dtype), reference.to(dtype)), dtype


@pytest.mark.parametrize("seed", range(3))
def test_dequantisation_of_any_bytes_equals_pytorch_bit_for_bit(kernel, seed):
    """Every code (-0.0 among them) and scale byte (NaN among them), with divisors that are
    zero, negative, huge or tiny: the same bits as PyTorch, NaN payloads aside."""
    blob, divisors = dequant_kernel.random_nvfp4_blob(48, 128, torch.Generator().manual_seed(seed))
    for dtype in (torch.float32, torch.bfloat16):
        assert same_bits(kernel.dequantize(blob, divisors, dtype), nvfp4.dequantize(blob, divisors, dtype))


@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 17])
@pytest.mark.parametrize(("n", "k"), [(37, 48), (300, 224)])
def test_products_equal_pytorch(kernel, tokens, n, k):
    blob, divisors = _blob(n, k, seed=k)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    expected = x.double() @ nvfp4.dequantize(blob, divisors).double().T
    y = kernel.matmul(x, blob, divisors)
    assert y.shape == (tokens, n) and y.dtype == torch.float32
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error < PRODUCT_RTOL, error


def test_rows_apart_in_memory_and_one_shared_divisor_are_read_right(kernel):
    """A blob that is a column slice of a wider buffer (rows further apart than their width), and
    the release's one global divisor per matrix instead of one per row."""
    blob, divisors = _blob(40, 64, row_stride=128)
    assert blob.stride(0) == 128
    one = divisors[:1]
    reference = nvfp4.dequantize(blob, one)
    assert same_bits(kernel.dequantize(blob, one), reference.to(torch.bfloat16))
    x = torch.randn(2, 64)
    expected = x.double() @ reference.double().T
    assert ((kernel.matmul(x, blob, one).double() - expected).abs().max() / expected.abs().max()) < PRODUCT_RTOL


def test_a_blob_on_another_device_or_with_strided_columns_is_refused(kernel):
    blob, divisors = _blob(8, 32)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.matmul(torch.randn(1, 32), blob.view(torch.uint8)[:, ::1].t().contiguous().t(), divisors)


@needs_compiler
def test_an_expert_on_the_cpu_takes_the_kernel_for_a_few_tokens_and_dequantises_for_many(monkeypatch):
    """compute.cpu_expert_forward: the kernel's products for a decode step's tokens, its
    dequantisation (then PyTorch's matmul) for a prefill chunk's; both equal the eager path within
    bf16 rounding."""
    gate_up, gu_div = _blob(2 * 96, 64, seed=1)
    down, d_div = _blob(64, 96, seed=2)
    calls = {"matmul": 0, "dequantize": 0}
    real = nvfp4_cpu.kernel()
    assert real is not None

    class Spy:
        def matmul(self, *a):
            calls["matmul"] += 1
            return real.matmul(*a)

        def dequantize(self, *a):
            calls["dequantize"] += 1
            return real.dequantize(*a)

    monkeypatch.setattr(nvfp4_cpu, "kernel", lambda: Spy())
    for tokens, path in ((3, "matmul"), (nvfp4_cpu.MAX_MATMUL_TOKENS + 1, "dequantize")):
        x = torch.randn(tokens, 64).to(torch.bfloat16)
        before = dict(calls)
        y = compute.cpu_expert_forward(x, gate_up, gu_div, down, d_div, torch.bfloat16)
        expected = compute.expert_forward(x, nvfp4.dequantize(gate_up, gu_div, torch.bfloat16),
                                          nvfp4.dequantize(down, d_div, torch.bfloat16))
        assert calls[path] == before[path] + 2, calls  # gate_up and down
        torch.testing.assert_close(y.float(), expected.float(), rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_without_a_compiler_pytorch_serves_and_the_plan_knows(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert nvfp4_cpu.load(cache_dir=tmp_path) is None
    assert "no C compiler" in caplog.text
    monkeypatch.setattr(nvfp4_cpu, "kernel", lambda: None)
    assert not nvfp4_cpu.available()
    gate_up, gu_div = _blob(2 * 32, 32)
    down, d_div = _blob(32, 32, seed=3)
    x = torch.randn(1, 32)
    y = compute.cpu_expert_forward(x, gate_up, gu_div, down, d_div, torch.float32)
    expected = compute.expert_forward(x, nvfp4.dequantize(gate_up, gu_div), nvfp4.dequantize(down, d_div))
    assert torch.equal(y, expected)


@needs_compiler
def test_a_failed_build_is_logged_and_leaves_nothing_behind(tmp_path, caplog):
    broken = tmp_path / "broken.c"
    broken.write_text("int quire(void) { return }\n")
    with caplog.at_level(logging.WARNING):
        assert native_build.build(broken, cache_dir=tmp_path / "cache") is None
    assert "could not build broken.c" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library


@needs_compiler
def test_a_built_library_is_reused_and_a_changed_source_rebuilt(tmp_path, monkeypatch):
    source = tmp_path / "answer.c"
    source.write_text("int quire_answer(void) { return 42; }\n")
    cache = tmp_path / "cache"
    assert native_build.build(source, cache_dir=cache).quire_answer() == 42
    compiled: list[Path] = []
    real_compile = native_build._compile
    monkeypatch.setattr(native_build, "_compile", lambda *a: (compiled.append(a[-1]), real_compile(*a)))
    assert native_build.build(source, cache_dir=cache).quire_answer() == 42
    assert compiled == []  # the cached library served
    source.write_text("int quire_answer(void) { return 43; }\n")
    assert native_build.build(source, cache_dir=cache).quire_answer() == 43
    assert len(compiled) == 1 and len(list(cache.glob("answer-*.so"))) == 2
    (tmp_path / "shared.h").write_text("/* a header the source may include */\n")
    assert native_build.build(source, cache_dir=cache).quire_answer() == 43
    assert len(compiled) == 2  # a changed header beside it builds again


@needs_compiler
def test_a_kernel_that_disagrees_with_pytorch_is_not_used(kernel, monkeypatch, caplog, tmp_path):
    """The self-test guards the build: a kernel whose products are off (a miscompile, a CPU
    quirk) is refused at load and PyTorch serves."""
    assert nvfp4_cpu.self_test(kernel) == ""
    real_matmul = kernel.matmul
    monkeypatch.setattr(kernel, "matmul", lambda x, blob, div: real_matmul(x, blob, div) * 1.001)
    assert "products off" in nvfp4_cpu.self_test(kernel)
    monkeypatch.setattr(nvfp4_cpu, "Kernel", lambda lib: kernel)
    with caplog.at_level(logging.WARNING):
        assert nvfp4_cpu.load(cache_dir=tmp_path) is None
    assert "disagrees with PyTorch" in caplog.text


def test_the_kernels_can_be_switched_off(monkeypatch, tmp_path):
    """QUIRE_CPU_KERNELS=off (the benchmark's --no-cpu-kernels baseline) keeps PyTorch's paths."""
    monkeypatch.setenv(native_build.DISABLE_ENV, "off")
    assert native_build.build(nvfp4_cpu.SOURCE, cache_dir=tmp_path) is None
    assert nvfp4_cpu.load(cache_dir=tmp_path) is None and not any(tmp_path.iterdir())


def test_inputs_of_the_wrong_width_or_place_are_refused(kernel):
    """The kernels read M x K floats from x: anything else would read past its end."""
    blob, divisors = _blob(8, 64)
    for bad in (torch.randn(1, 32), torch.randn(64), torch.randn(1, 64, device="meta")):
        with pytest.raises(ValueError, match=r"host inputs \[M, 64\]"):
            kernel.matmul(bad, blob, divisors)


@needs_compiler
def test_a_compiler_that_refuses_native_flags_gets_the_portable_build(tmp_path, monkeypatch, caplog):
    real = native_build.compiler()
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    with caplog.at_level(logging.WARNING):
        built = nvfp4_cpu.load(cache_dir=tmp_path / "cache")
    assert built is not None and not built.simd
    assert "-march=native" in caplog.text


@needs_compiler
def test_a_damaged_cached_library_is_replaced(tmp_path):
    cache = tmp_path / "cache"
    library = native_build.library_path(nvfp4_cpu.SOURCE, native_build.NATIVE_FLAGS,
                                        native_build.compiler(), cache)
    cache.mkdir()
    library.write_bytes(b"not a library")  # e.g. a disk that filled up while it was written
    assert native_build.build(nvfp4_cpu.SOURCE, cache_dir=cache) is not None  # the portable one
    assert not library.exists()  # removed: the next start builds it again
    assert native_build.build(nvfp4_cpu.SOURCE, cache_dir=cache) is not None and library.exists()

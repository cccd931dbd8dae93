"""The FP8 CPU kernel (engine/experts/fp8_cpu.c, built by engine.native_build) against PyTorch's
reading of E4M3: products within fp32 summation-order error over every byte value, NaN kept, in
its vector (AVX2) and portable builds; its refusals; and the path cpu_expert_forward takes."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import native_build
from engine.experts import compute, dequant_kernel, fp8_cpu, store
from engine.quant import FP8_DTYPE
from tests.helpers.cpu_features import built_kernel

# Rows split over three threads (spans of uneven length), whatever the machine's count.
pytestmark = pytest.mark.usefixtures("three_cpu_threads")

same_bits = dequant_kernel.same_bits  # NaN matches NaN; -0.0 does not match 0.0
PRODUCT_RTOL = 1e-5  # of the largest product: fp32 sums in another order, over K <= 1,000 inputs


@pytest.fixture(scope="module", params=["native", "portable"])
def kernel(request, tmp_path_factory) -> fp8_cpu.Kernel:
    return built_kernel(fp8_cpu, request.param, tmp_path_factory.mktemp("kernels"))


def _relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.double() - expected).abs().max() / expected.abs().max()).item()


# K: 104 (the vector loop's 8-input tail after 16-input steps), 36 (and a 4-input scalar tail),
# 256; N: one row, rows that do not split evenly over threads, and enough rows (>= 64 per
# thread) that the work is split.
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 17])
@pytest.mark.parametrize(("n", "k"), [(1, 104), (37, 256), (300, 104), (40, 36)])
def test_products_over_every_byte_equal_pytorch(kernel, tokens, n, k):
    g = torch.Generator().manual_seed(n + k)
    weight = fp8_cpu.every_byte_matrix(n, k, g)
    x = torch.randn(tokens, k, generator=g).to(torch.bfloat16)
    expected = x.double() @ weight.to(torch.float64).T * 0.375
    y = kernel.matmul(x, weight, torch.tensor(0.375))
    assert y.shape == (tokens, n) and y.dtype == torch.float32
    assert _relative_error(y, expected) < PRODUCT_RTOL


def test_subnormal_weights_keep_their_value(kernel):
    """E4M3's subnormals (exponent bits 0) are 2^-9 x their mantissa: decoding by bits must not
    flush them to zero."""
    weight = torch.arange(1, 8, dtype=torch.uint8).repeat(1, 8)[:, :8].view(FP8_DTYPE)  # 0x01-0x07
    x = torch.ones(1, 8)
    assert kernel.matmul(x, weight, 1.0).item() == pytest.approx(weight.float().sum().item(), rel=1e-6)
    assert weight.float().sum().item() > 0


def test_a_nan_weight_gives_nan_and_rows_apart_in_memory_are_read_right(kernel):
    g = torch.Generator().manual_seed(1)
    wide = fp8_cpu.every_byte_matrix(20, 96, g)
    weight = wide[:, :64]  # rows 96 bytes apart
    x = torch.randn(2, 64, generator=g)
    expected = x.double() @ weight.to(torch.float64).T
    assert _relative_error(kernel.matmul(x, weight, 1.0), expected) < PRODUCT_RTOL
    weight.view(torch.uint8)[3, 10] = 0xFF
    y = kernel.matmul(x, weight, 1.0)
    assert y[:, 3].isnan().all() and not y[:, :3].isnan().any()


def test_what_it_cannot_read_is_refused(kernel):
    weight = fp8_cpu.every_byte_matrix(8, 64, torch.Generator().manual_seed(2))
    x = torch.randn(1, 64)
    for bad, message in ((weight.to(torch.bfloat16), "host FP8"), (weight.t(), "contiguous"),
                         (weight[None], "host FP8")):
        with pytest.raises(ValueError, match=message):
            kernel.matmul(x, bad, 1.0)
    with pytest.raises(ValueError, match="one multiplier"):
        kernel.matmul(x, weight, torch.ones(8))


def test_a_kernel_that_disagrees_with_pytorch_is_not_used(kernel, monkeypatch, caplog, tmp_path):
    assert fp8_cpu.self_test(kernel) == ""
    real_matmul = kernel.matmul
    monkeypatch.setattr(kernel, "matmul", lambda x, w, s: real_matmul(x, w, s).nan_to_num(0.0))
    assert "NaN" in fp8_cpu.self_test(kernel)
    monkeypatch.setattr(kernel, "matmul", lambda x, w, s: real_matmul(x, w, s) * 1.001)
    assert "products off" in fp8_cpu.self_test(kernel)
    monkeypatch.setattr(fp8_cpu, "Kernel", lambda lib: kernel)
    with caplog.at_level(logging.WARNING):
        assert fp8_cpu.load(cache_dir=tmp_path) is None
    assert "disagrees with PyTorch" in caplog.text


@pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler on this machine")
def test_an_expert_on_the_cpu_takes_the_kernel_for_a_few_tokens_only(monkeypatch):
    g = torch.Generator().manual_seed(3)
    gate_up, down = (torch.randn(2 * 48, 64, generator=g) * 0.2).to(FP8_DTYPE), \
        (torch.randn(64, 48, generator=g) * 0.2).to(FP8_DTYPE)
    gu_scale, d_scale = torch.tensor(0.5), torch.tensor(2.0)
    assert fp8_cpu.available()  # built and self-tested before the spy counts calls
    calls: list[int] = []
    real_matmul = fp8_cpu.Kernel.matmul
    monkeypatch.setattr(fp8_cpu.Kernel, "matmul",
                        lambda self, x, *a: (calls.append(len(x)), real_matmul(self, x, *a))[1])
    for tokens in (1, fp8_cpu.MAX_MATMUL_TOKENS, fp8_cpu.MAX_MATMUL_TOKENS + 1):
        x = torch.randn(tokens, 64, generator=g)
        y = compute.cpu_expert_forward(x, gate_up, gu_scale, down, d_scale, torch.float32)
        expected = compute.expert_forward(x, *compute.dequant_expert(gate_up, gu_scale, down, d_scale,
                                                                     torch.float32))
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert calls == [1, 1, fp8_cpu.MAX_MATMUL_TOKENS, fp8_cpu.MAX_MATMUL_TOKENS]  # gate_up, down


@pytest.mark.parametrize("source", ["every-byte", "normal-weights"])
def test_int8_requantisation_equals_pytorch_bit_for_bit(kernel, source):
    """Codes and row peaks as engine.experts.store.int8_codes computes them, ties to even
    included (common with real weights: a value times 127 over its row's peak lands on .5), for
    an all-zero row, and rows apart in memory."""
    g = torch.Generator().manual_seed(4)
    if source == "every-byte":
        weight = fp8_cpu.every_byte_matrix(150, 200, g)
    else:
        weight = (torch.randn(150, 200, generator=g) * 0.05).to(FP8_DTYPE)
    weight[7] = 0
    weight = torch.cat([weight, weight], dim=1)[:, :190]  # rows 400 bytes apart; a 6-input tail
    codes, peaks = store.int8_codes(weight.to(torch.float32))
    ours = torch.full_like(codes, 99)
    assert torch.equal(kernel.requantize_int8(weight, ours), peaks)
    assert torch.equal(ours, codes)
    with pytest.raises(ValueError, match="int8 codes"):
        kernel.requantize_int8(weight, ours[:, :64].contiguous())


@pytest.mark.skipif(native_build.compiler() is None, reason="no C compiler on this machine")
def test_the_int8_host_copy_is_the_same_with_or_without_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(5)
    weights = (torch.randn(3, 64, 96, generator=g) * 0.1).to(FP8_DTYPE)
    scales = torch.rand(3, generator=g)
    with_kernel = store.requantize_int8(weights, scales)
    monkeypatch.setattr(fp8_cpu, "kernel", lambda: None)
    without = store.requantize_int8(weights, scales)
    assert all(torch.equal(a, b) for a, b in zip(with_kernel, without, strict=True))


def test_a_row_holding_a_nan_gets_zero_codes_and_a_nan_peak(kernel):
    weight = fp8_cpu.every_byte_matrix(4, 40, torch.Generator().manual_seed(6))
    weight.view(torch.uint8)[2, 17] = 0x7F
    codes = torch.full((4, 40), 5, dtype=torch.int8)
    peaks = kernel.requantize_int8(weight, codes)
    assert peaks[2].isnan() and not codes[2].any()
    expected, expected_peaks = store.int8_codes(weight.to(torch.float32))
    assert torch.equal(codes[[0, 1, 3]], expected[[0, 1, 3]]) and torch.equal(peaks[[0, 1, 3]], expected_peaks[[0, 1, 3]])


def test_inputs_of_the_wrong_width_or_place_are_refused(kernel):
    weight = fp8_cpu.every_byte_matrix(8, 64, torch.Generator().manual_seed(7))
    for bad in (torch.randn(1, 8), torch.randn(64), torch.randn(1, 64, device="meta")):
        with pytest.raises(ValueError, match=r"host inputs \[M, 64\]"):
            kernel.matmul(bad, weight, 1.0)


@pytest.mark.parametrize("source", ["every-byte", "with-nan"])
def test_dequantisation_equals_pytorch_bit_for_bit(kernel, source):
    """e4m3 x scale rounded once, as compute.eager_dequantize's PyTorch arithmetic (NaN payloads
    aside), with a tail of K % 8 inputs."""
    weight = fp8_cpu.every_byte_matrix(90, 61, torch.Generator().manual_seed(8))
    if source == "with-nan":
        weight.view(torch.uint8)[::7, ::5] = 0xFF
    for scale in (0.375, 3e-39, 1e38):  # a subnormal and an overflowing product among them
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            expected = (weight.to(torch.float32) * torch.tensor(scale)).to(dtype)
            assert same_bits(kernel.dequantize(weight, scale, dtype), expected), (scale, dtype)

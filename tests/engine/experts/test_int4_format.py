"""The int4 host format's blob (engine/experts/int4.py): packing, rounding, the CPU kernel.

Tolerances: min-max rounding to 16 levels errs by at most half a step (scale / 2) per weight,
plus the bf16 rounding of scale and offset (2^-8 relative, times at most 8 steps and the offset).
PyTorch's CPU int4 kernel against the dequantised matrix: 1e-4 relative in fp32 (it reorders
sums), 5e-3 relative in bf16 (its bf16 output rounding; 2.8e-3 seen up to 300 x 4096 x 2048).
"""

from __future__ import annotations

import pytest
import torch

from engine.experts import int4
from engine.experts.compute import cpu_expert_forward, dequant_expert, expert_forward
from engine.experts.pinned import is_page_locked


def _weights(n: int = 128, k: int = 192, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[3, 64:128] = 0.25  # a constant group: scale 0, every code 8
    w[5] *= 40  # a row of large values next to small ones
    return w


def test_codes_pack_and_unpack_exactly():
    codes = torch.randint(0, 16, (128, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = int4.pack_codes(codes)
    assert packed.shape == (128, 48)
    assert torch.equal(int4.unpack_codes(packed, 128, 96), codes)
    # The documented layout: byte (b, k, j) = code(64b + j, k) | code(64b + 32 + j, k) << 4.
    flat = packed.reshape(2, 96, 32)
    assert int(flat[1, 7, 5]) == int(codes[64 + 5, 7]) | int(codes[64 + 32 + 5, 7]) << 4


@pytest.mark.parametrize("multiplier", [1.0, 0.02])
def test_rounding_errs_by_at_most_half_a_step(multiplier):
    """The expert's multiplier (FP8's per-expert scale) scales (scale, offset), not the codes."""
    raw = _weights() / multiplier
    blob = int4.quantize(raw.to(torch.bfloat16), multiplier)
    w = raw.to(torch.bfloat16).float() * multiplier
    assert blob.shape == (128, int4.blob_width(192)) and int4.matrix_shape(blob) == (128, 192)
    back = int4.dequantize(blob, torch.float32)
    groups = w.reshape(128, -1, int4.GROUP)
    step = (groups.amax(2) - groups.amin(2)) / int4.MAX_CODE  # [N, G]
    bound = step * 0.5 + (step * 8 + groups.abs().amax(2)) * 2**-8 + 1e-7
    error = (back - w).abs().reshape(128, -1, int4.GROUP).amax(2)
    assert bool((error <= bound).all()), float((error - bound).max())
    assert torch.equal(back[3, 64:128], w[3, 64:128].to(torch.bfloat16).float())  # exact constant
    rel = float((back - w).norm() / w.norm())
    assert rel < 0.12  # ~9% for Gaussian weights: 4-bit min-max rounding


def test_widths_the_layout_cannot_take_are_refused():
    from engine.errors import InputError

    with pytest.raises(InputError, match="multiple of 64"):
        int4.quantize(torch.zeros(64, 96))
    with pytest.raises(ValueError, match="not an int4 blob width"):
        int4.matrix_shape(torch.zeros(64, 70, dtype=torch.uint8))


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-3)])
def test_the_cpu_kernel_computes_the_dequantised_matmul(dtype, rtol):
    assert int4.cpu_kernel_matches()  # PyTorch 2.13 packs as we do
    blob = int4.quantize(_weights())
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    ours = int4.cpu_matmul(x, blob).float()
    ref = x.float() @ int4.dequantize(blob, dtype).float().t()
    assert float((ours - ref).abs().max() / ref.abs().max()) < rtol


def test_without_a_matching_cpu_kernel_the_matmul_dequantises(monkeypatch):
    blob = int4.quantize(_weights())
    x = torch.randn(2, 192, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(int4, "cpu_kernel_matches", lambda: False)
    assert torch.equal(int4.cpu_matmul(x, blob), x @ int4.dequantize(blob, torch.float32).t())


def test_a_changed_packing_in_pytorch_is_detected(monkeypatch):
    int4.cpu_kernel_matches.cache_clear()
    real = torch.ops.aten._convert_weight_to_int4pack_for_cpu

    def swapped_nibbles(w, tiles):  # a PyTorch release that packs the other way round
        packed = real(w, tiles)
        return (packed >> 4) | (packed << 4)

    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", swapped_nibbles)
    try:
        assert not int4.cpu_kernel_matches()
    finally:
        monkeypatch.undo()
        int4.cpu_kernel_matches.cache_clear()
    assert int4.cpu_kernel_matches()


def test_cpu_expert_from_int4_blobs_matches_its_dequantised_weights():
    from engine.experts.store import requantize_int4

    gen = torch.Generator().manual_seed(4)
    gu = (torch.randn(2, 128, 64, generator=gen) * 50).to(torch.float8_e4m3fn)
    dn = (torch.randn(2, 64, 64, generator=gen) * 50).to(torch.float8_e4m3fn)
    scales = torch.tensor([0.01, 0.02])
    gu_b, dn_b = requantize_int4(gu, scales), requantize_int4(dn, scales)
    empty = torch.empty(0)
    x = torch.randn(3, 64, generator=gen)
    ours = cpu_expert_forward(x, gu_b[1], empty, dn_b[1], empty, torch.float32)
    ref = expert_forward(x, *dequant_expert(gu_b[1], empty, dn_b[1], empty, torch.float32))
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-4
    exact = expert_forward(x, *dequant_expert(gu[1], scales[1], dn[1], scales[1], torch.float32))
    # The format's rounding: ~9% per matrix, 0.20 measured through both and the gate.
    assert float((ours - exact).norm() / exact.norm()) < 0.3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_quantises_as_the_cpu_does():
    """The load path requantises on the first GPU. Fused multiply-adds there may move a code that
    sits on a rounding boundary by one step, so the blobs are compared by their meaning: scales
    exactly, codes at 99.9% or more, every weight within one step."""
    from engine.experts.store import requantize_int4

    gen = torch.Generator().manual_seed(5)
    weights = (torch.randn(3, 128, 192, generator=gen) * 30).to(torch.float8_e4m3fn)
    scales = torch.tensor([0.01, 0.02, 0.005])
    on_cpu = requantize_int4(weights, scales)
    on_gpu = requantize_int4(weights, scales, pin=True, device=torch.device("cuda"))
    assert on_gpu.device.type == "cpu" and is_page_locked(on_gpu)
    for cpu_blob, gpu_blob in zip(on_cpu, on_gpu, strict=True):
        (cpu_codes, cpu_scales), (gpu_codes, gpu_scales) = int4.split(cpu_blob), int4.split(gpu_blob)
        assert torch.equal(cpu_scales, gpu_scales)
        assert float((cpu_codes == gpu_codes).float().mean()) >= 0.999
        step = cpu_scales[..., 0].float().abs().amax()
        diff = int4.dequantize(cpu_blob, torch.float32) - int4.dequantize(gpu_blob, torch.float32)
        assert float(diff.abs().max()) <= float(step) * 1.001

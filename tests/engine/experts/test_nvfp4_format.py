"""The NVFP4 host format (engine.experts.nvfp4): the shipped layout read as compressed-tensors
reads it, blobs, and the tiny checkpoints' quantiser."""

from __future__ import annotations

import pytest
import torch

from engine.experts import nvfp4


def test_low_nibble_is_the_even_column_and_the_global_scale_divides():
    packed = torch.tensor([[0x2F, 0x07]], dtype=torch.uint8)  # codes 15, 2 | 7, 0
    scales = torch.tensor([[2.0]]).to(torch.float8_e4m3fn)  # one group of 16... of 4 inputs here
    values = nvfp4.dequantize_shipped(packed.repeat(1, 4), scales, torch.tensor([4.0]))
    assert values[0, :4].tolist() == [-6 * 0.5, 1 * 0.5, 6 * 0.5, 0.0]


def test_blobs_hold_the_shipped_bytes_and_dequantise_alike():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen)
    packed, scales, global_scale = nvfp4.quantize(w)
    blob = torch.empty(48, nvfp4.blob_width(96), dtype=nvfp4.BLOB_DTYPE)
    nvfp4.pack(packed, scales, blob)
    codes, blob_scales = nvfp4.codes_and_scales(blob)
    assert torch.equal(codes, packed) and torch.equal(blob_scales.view(torch.uint8), scales.view(torch.uint8))
    assert nvfp4.matrix_shape(blob) == (48, 96)
    by_blob = nvfp4.dequantize(blob, global_scale.expand(48))
    assert torch.equal(by_blob, nvfp4.dequantize_shipped(packed, scales, global_scale))


def test_quantise_rounds_to_the_nearest_value_of_each_group():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen) * torch.rand(64, 1, generator=gen)
    w[3, 16:32] = 0.0  # an all-zero group stays zero
    packed, scales, global_scale = nvfp4.quantize(w)
    back = nvfp4.dequantize_shipped(packed, scales, global_scale)
    step = (scales.float() / global_scale).repeat_interleave(16, dim=1)  # value of code 1.0
    # The largest gap between neighbouring E2M1 values is 2 (4 -> 6): at most half of it.
    assert ((back - w).abs() <= step + 1e-6).all()
    assert (back[3, 16:32] == 0).all()
    error = ((back - w).pow(2).mean() / w.pow(2).mean()).sqrt()
    assert 0.05 < error < 0.15  # ~10% relative RMS, as 4-bit formats go


def test_widths_that_are_not_blobs_are_refused():
    with pytest.raises(ValueError, match="not an NVFP4 blob width"):
        nvfp4.matrix_shape(torch.empty(4, 37, dtype=torch.uint8))
    with pytest.raises(ValueError, match="groups of 16"):
        nvfp4.quantize(torch.randn(4, 40))
    assert nvfp4.expert_bytes(4096, 2048) == 14_188_544  # blobs and divisors, 0.56x FP8's 25.2 MB

"""FP8 dequantisation (engine.quant): a fused expert tensor one expert at a time, bit for bit
the whole-tensor formula (the real shapes would otherwise need 17 GB of fp32 temporaries)."""

from __future__ import annotations

import pytest
import torch

from engine.quant import FP8_DTYPE, dequantize


@pytest.mark.parametrize("scale_shape", [(5, 1, 1), (1, 1, 1), ()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_experts_equal_the_whole_tensor_formula(scale_shape, dtype):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(5, 12, 20, generator=g) * 40).to(FP8_DTYPE)
    scale = torch.rand(scale_shape, generator=g).to(torch.bfloat16)
    expected = (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)
    ours = dequantize(weight, scale, dtype)
    assert ours.dtype == dtype and torch.equal(ours.view(torch.int16 if dtype == torch.bfloat16
                                                         else torch.int32),
                                               expected.view(torch.int16 if dtype == torch.bfloat16
                                                             else torch.int32))


def test_a_missing_scale_is_refused_and_other_dtypes_pass_through():
    with pytest.raises(ValueError, match="needs its scale"):
        dequantize(torch.zeros(2, 2).to(FP8_DTYPE), None, torch.bfloat16)
    assert dequantize(torch.ones(2, 2), None, torch.bfloat16).dtype == torch.bfloat16

"""The expert matmul kernels (engine/experts/fp8_kernel.py) without a GPU.

Triton's interpreter runs the kernels with numpy on CPU tensors. It is switched on when a kernel
is decorated, so the `kernels` fixture loads a private copy of the module with
TRITON_INTERPRET=1 set (for this file's tests only); engine.experts.fp8_kernel itself stays as
production imports it. The interpreter has no bf16 arithmetic, so there the dot operands are
fp32 (exact for these values, see the module docstring). The bf16 tensor-core code is covered
by compiling the production kernel for sm_90 here (no GPU needed: Triton ships ptxas) and by
running it in the cuda-marked tests.

Tolerance: 4% of the largest output of each expert. The eager reference rounds every scaled
weight and the gate_up output to bf16 (its own error against float64 is ~1% of the largest
output here); the interpreter's fp32 -> bf16 conversion truncates where the GPU rounds to
nearest, at three points (gate_up output, hidden, output), which doubles the kernel's rounding
error: observed kernel-vs-eager errors are up to 2.3% under the interpreter. A 10% scale
error (>= 7.5% after rounding) or a wrong slot must show, and the tests below check that it does.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.experts import fp8_kernel
from engine.experts.compute import dequant_expert, expert_forward
from engine.experts.store import requantize_int8
from tests.helpers.triton_interpreter import (
    QUIET_INTERPRETER,
    interpreted_kernels,
)

TOL = 0.04
SHAPES = [(64, 32), (72, 36)]  # (H, I); 72 and 36 are ragged for every block size used
BLOCKS = {"default": (fp8_kernel.BLOCK_N, fp8_kernel.BLOCK_K), "small": (16, 32)}
FORMATS = ["fp8", "int8"]
pytestmark = QUIET_INTERPRETER


kernels = interpreted_kernels(fp8_kernel)  # a private copy whose kernels run under the interpreter


@pytest.fixture(params=list(BLOCKS))
def blocks(request, kernels, monkeypatch):
    """Default blocks mask most of a tile; small ones take several K steps and N blocks."""
    block_n, block_k = BLOCKS[request.param]
    monkeypatch.setattr(kernels, "BLOCK_N", block_n)
    monkeypatch.setattr(kernels, "BLOCK_K", block_k)
    return kernels


def make_slots(fmt: str, hidden: int, width: int, slots: int = 6, seed: int = 0):
    """(gate_up [S, 2I, H], per-slot scales, down [S, H, I], per-slot scales), one byte each."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(slots, 2 * width, hidden, generator=gen) * 30).to(torch.float8_e4m3fn)
    down = (torch.randn(slots, hidden, width, generator=gen) * 30).to(torch.float8_e4m3fn)
    scales = (torch.rand(slots, generator=gen) + 0.5) * hidden**-0.5 / 30
    if fmt == "fp8":
        return gate_up, scales, down, scales.clone()
    gu_q, gu_rows = requantize_int8(gate_up, scales)
    dn_q, dn_rows = requantize_int8(down, scales)
    return gu_q, gu_rows, dn_q, dn_rows


def tokens(count: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def eager(x, gu, gu_s, dn, dn_s) -> torch.Tensor:
    return expert_forward(x, *dequant_expert(gu, gu_s, dn, dn_s, torch.bfloat16))


def rel_errors(ours: torch.Tensor, refs: list[torch.Tensor]) -> list[float]:
    """Per expert: max |ours - ref| / max |ref|."""
    assert ours.dtype == torch.bfloat16 and ours.shape == (len(refs), *refs[0].shape)
    return [float((o.float() - r.float()).abs().max() / r.float().abs().max())
            for o, r in zip(ours, refs, strict=True)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_single_expert_kernel_matches_the_eager_path(blocks, fmt, shape):
    gu, gu_s, dn, dn_s = make_slots(fmt, *shape)
    for count in (1, 5, 16):
        x = tokens(count, shape[0])
        ours = torch.stack([blocks.fp8_expert_forward(x, gu[i], gu_s[i], dn[i], dn_s[i])
                            for i in (0, 3)])
        refs = [eager(x, gu[i], gu_s[i], dn[i], dn_s[i]) for i in (0, 3)]
        assert max(rel_errors(ours, refs)) < TOL, (count, rel_errors(ours, refs))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_grouped_kernel_matches_the_eager_path(blocks, fmt, shape):
    gu, gu_s, dn, dn_s = make_slots(fmt, *shape)
    ids = torch.tensor([4, 1, 5, 0], dtype=torch.int32)  # unsorted, slots 2 and 3 unused
    for count in (1, 3, 16):
        x = tokens(count, shape[0])
        ours = blocks.grouped_expert_forward(x, gu, dn, ids, gu_s[ids], dn_s[ids])
        refs = [eager(x, gu[i], gu_s[i], dn[i], dn_s[i]) for i in ids.tolist()]
        assert max(rel_errors(ours, refs)) < TOL, (count, rel_errors(ours, refs))


@pytest.mark.parametrize("fmt", FORMATS)
def test_grouped_kernel_reads_scales_by_expert_id(blocks, fmt):
    """As the offload cache calls it: slot s holds some expert e != s, and the kernel reads e's
    row of the layer's scale tables itself (a slot's index would give the wrong scale)."""
    hidden, width = SHAPES[1]
    gu, gu_s, dn, dn_s = make_slots(fmt, hidden, width)
    holds = torch.tensor([3, 5, 0, 4, 1, 2])  # slot -> the expert it holds
    slots_gu, slots_dn = gu[holds], dn[holds]
    slot_ids = torch.tensor([1, 4, 2], dtype=torch.int32)
    expert_ids = holds[slot_ids.long()].to(torch.int32)  # experts 5, 1, 0
    x = tokens(2, hidden)
    ours = blocks.grouped_expert_forward(x, slots_gu, slots_dn, slot_ids, gu_s, dn_s, expert_ids)
    refs = [eager(x, gu[e], gu_s[e], dn[e], dn_s[e]) for e in expert_ids.tolist()]
    assert max(rel_errors(ours, refs)) < TOL
    by_slot = blocks.grouped_expert_forward(x, slots_gu, slots_dn, slot_ids, gu_s, dn_s, slot_ids)
    assert min(rel_errors(by_slot, refs)) > TOL  # every expert's scale is then another's
    with pytest.raises(ValueError, match="expert ids for 2"):
        blocks.grouped_expert_forward(x, slots_gu, slots_dn, slot_ids, gu_s, dn_s, expert_ids[:2])


def nan_padded(w: torch.Tensor, pad: int = 40) -> torch.Tensor:
    """w [S, R, C] FP8 as a view whose rows are followed by `pad` NaNs (E4M3 0x7F)."""
    wide = torch.full((*w.shape[:2], w.shape[2] + pad), 0x7F, dtype=torch.uint8, device=w.device)
    wide = wide.view(torch.float8_e4m3fn)
    wide[..., :w.shape[2]] = w
    return wide[..., :w.shape[2]]  # row stride C + pad, still K-contiguous


def test_strided_slots_and_ragged_tiles(blocks):
    """Slots whose rows are padded (row stride > K). On a GPU the NaN padding would also turn an
    unmasked K tail into NaN; the interpreter reads E4M3 NaN as 480 (times a masked-out zero
    input: 0), so here it checks the strides, not that mask."""
    hidden, width = SHAPES[1]
    gu, gu_s, dn, dn_s = make_slots("fp8", hidden, width)
    gu_padded, dn_padded = nan_padded(gu), nan_padded(dn)
    ids, x = torch.tensor([5, 2], dtype=torch.int32), tokens(3, hidden)
    ours = blocks.grouped_expert_forward(x, gu_padded, dn_padded, ids, gu_s[ids], dn_s[ids])
    refs = [eager(x, gu[i], gu_s[i], dn[i], dn_s[i]) for i in ids.tolist()]
    assert max(rel_errors(ours, refs)) < TOL
    single = blocks.fp8_expert_forward(x, gu_padded[5], gu_s[5], dn_padded[5], dn_s[5])
    assert max(rel_errors(single[None], refs[:1])) < TOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_wrong_scale_or_slot_is_caught(kernels, fmt):
    gu, gu_s, dn, dn_s = make_slots(fmt, *SHAPES[1])
    x, ids = tokens(2, SHAPES[1][0]), torch.tensor([4, 1, 5, 0], dtype=torch.int32)
    refs = [eager(x, gu[i], gu_s[i], dn[i], dn_s[i]) for i in ids.tolist()]
    wrong_scale = dn_s[ids].clone()
    wrong_scale[2] *= 1.1  # 10% off for the third expert only
    errors = rel_errors(kernels.grouped_expert_forward(x, gu, dn, ids, gu_s[ids], wrong_scale),
                        refs)
    assert [e > TOL for e in errors] == [False, False, True, False], errors
    swapped = ids[[1, 0, 2, 3]]  # the first two experts' slots exchanged, scales left in place
    errors = rel_errors(kernels.grouped_expert_forward(x, gu, dn, swapped, gu_s[ids], dn_s[ids]),
                        refs)
    assert [e > TOL for e in errors] == [True, True, False, False], errors


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_self_test_passes_and_catches_a_broken_kernel(kernels, monkeypatch, caplog, grouped, fmt):
    """Per format: a GPU whose Triton lacks E4M3 keeps the int8 kernel."""
    cpu = torch.device("cpu")
    assert kernels._self_test(cpu, 64, 32, grouped, fmt)
    launch = kernels._launch

    def off_by_ten_percent(*args, **kwargs):
        return launch(*args, **kwargs) * 1.1

    monkeypatch.setattr(kernels, "_launch", off_by_ten_percent)
    with caplog.at_level(logging.WARNING):
        assert not kernels._self_test(cpu, 64, 32, grouped, fmt)
    assert f"{fmt} expert kernel disagrees with the eager path" in caplog.text


def test_production_never_uses_the_interpreter(kernels):
    for module in (fp8_kernel, kernels):
        assert not module.kernel_usable(torch.device("cpu"), 64, 32)
        assert not module.grouped_kernel_usable(torch.device("cpu"), 64, 32)
    # Even given a GPU, an interpreted build must not serve: it is numpy, far too slow.
    assert not kernels.grouped_kernel_usable(torch.device("cuda", 0), 64, 32)


def test_bad_calls_are_refused(kernels):
    gu, gu_s, dn, dn_s = make_slots("fp8", *SHAPES[0])
    ids = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="tokens"):
        kernels.grouped_expert_forward(tokens(17, 64), gu, dn, ids, gu_s[ids], dn_s[ids])
    with pytest.raises(ValueError, match="scales for 3"):
        kernels.grouped_expert_forward(tokens(1, 64), gu, dn, ids, gu_s[:3], dn_s[ids])
    with pytest.raises(ValueError, match="K-contiguous"):
        kernels.fp8_expert_forward(tokens(1, 64), gu[0].t().contiguous().t(), gu_s[0], dn[0],
                                   dn_s[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_kernel_compiles_for_hopper(fmt, monkeypatch, tmp_path):
    """The production (bf16 tensor-core) kernel through Triton's whole pipeline to an sm_90
    cubin: type errors, illegal dot shapes or a register blow-up would fail here."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    weight = {"fp8": "*fp8e4nv", "int8": "*i8"}[fmt]
    signature = {"x_ptr": "*bf16", "w_ptr": weight, "y_ptr": "*bf16", "s_ptr": "*fp32",
                 "ids_ptr": "*i32", "sids_ptr": "*i32", **dict.fromkeys(
                     ["M", "N", "K", "stride_xe", "stride_xm", "stride_ws", "stride_wn",
                      "stride_ye", "stride_ym", "stride_se"], "i32")}
    for gated in (False, True):
        constants = {"INDEXED": True, "SCALE_INDEXED": True, "GATED": gated, "ROW_SCALES": fmt == "int8",
                     "DOT_DTYPE": triton.language.bfloat16, "BLOCK_M": fp8_kernel.BLOCK_M,
                     "BLOCK_N": fp8_kernel.BLOCK_N, "BLOCK_K": fp8_kernel.BLOCK_K}
        source = ASTSource(fp8_kernel._expert_matmul_kernel,
                           {**signature, **dict.fromkeys(constants, "constexpr")}, constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": fp8_kernel.NUM_WARPS, "num_stages": fp8_kernel.NUM_STAGES,
            "enable_fp_fusion": fp8_kernel.ENABLE_FP_FUSION})
        assert compiled.asm["cubin"] and "mma" in compiled.asm["ptx"]


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_grouped_kernel_on_the_gpu(fmt):
    device = torch.device("cuda", 0)
    assert fp8_kernel.grouped_kernel_usable(device, 256, 128)
    hidden, width = 264, 136  # ragged for the default blocks
    gu, gu_s, dn, dn_s = (t.to(device) for t in make_slots(fmt, hidden, width, slots=8))
    if fmt == "fp8":  # an unmasked K tail would read the NaNs
        gu, dn = nan_padded(gu), nan_padded(dn)
    ids = torch.tensor([6, 1, 3, 0], dtype=torch.int32, device=device)
    for count in (1, 4, 16):
        x = tokens(count, hidden).to(device)
        ours = fp8_kernel.grouped_expert_forward(x, gu, dn, ids, gu_s[ids], dn_s[ids])
        refs = [eager(x, gu[i], gu_s[i], dn[i], dn_s[i]) for i in ids.tolist()]
        assert max(rel_errors(ours, refs)) < TOL, (count, rel_errors(ours, refs))

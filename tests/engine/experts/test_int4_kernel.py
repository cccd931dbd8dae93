"""The int4 expert kernel (engine/experts/int4_kernel.py) without a GPU.

As for the FP8 kernel (tests/engine/experts/test_fp8_kernel.py): a private copy of the module
runs its kernel under Triton's interpreter on CPU tensors, with fp32 dot operands (every code - 8
and every bf16 activation is exact in both); the bf16 tensor-core build is covered by compiling
it for sm_90 here and by the cuda-marked test.

Tolerance: 4% of the largest output of each expert. The kernel computes with the exact
dequantised weights (scale * (x . (code - 8)) + offset * sum(x) per group, in fp32) where the
eager reference rounds every weight to bf16 (<= 2^-9 each) and then the gate_up output, hidden
and output as the kernel does; emulating the kernel's arithmetic with round-to-nearest (the GPU)
gives kernel-vs-eager errors up to 1.2% of the largest output. The interpreter's fp32 -> bf16
conversion truncates instead, at those three points, which roughly doubles that: observed up to
3.0% over 540 expert outputs of the shapes below (mean 1.6%). A 10% scale error, offsets of the
wrong sign or a wrong slot must show, and the tests below check that they do.
"""

from __future__ import annotations

import pytest
import torch

from engine.experts import int4, int4_kernel
from tests.helpers.triton_interpreter import (
    QUIET_INTERPRETER,
    assert_production_never_interprets,
    assert_self_test_catches_broken_kernels,
    interpreted_kernels,
    rel_errors,
    tokens,
)

TOL = 0.04
SHAPES = [(128, 64), (64, 128)]  # (H, I): several row blocks and K steps in each matrix
pytestmark = QUIET_INTERPRETER


kernels = interpreted_kernels(int4_kernel)  # a private copy whose kernels run under the interpreter


def eager_refs(x: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor, ids) -> list[torch.Tensor]:
    return [int4_kernel.eager(x, gu[i], dn[i]) for i in ids]


def padded(slots: torch.Tensor, pad: int = 36) -> torch.Tensor:
    """slots [S, N, W] as a view of a buffer with `pad` bytes of 0xFF (bf16 NaN) after each."""
    s, n, w = slots.shape
    wide = torch.full((s, n * w + pad), 0xFF, dtype=torch.uint8, device=slots.device)
    wide[:, :n * w] = slots.reshape(s, -1)
    return wide[:, :n * w].view(s, n, w)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_single_expert_kernel_matches_the_eager_path(kernels, shape):
    gu, dn = int4_kernel.random_blobs(*shape, experts=2)
    for count in (1, 5, 16):
        x = tokens(count, shape[0])
        ours = torch.stack([kernels.int4_expert_forward(x, gu[i], dn[i]) for i in (1, 0)])
        errors = rel_errors(ours, eager_refs(x, gu, dn, (1, 0)))
        assert max(errors) < TOL, (count, errors)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_grouped_kernel_matches_the_eager_path(kernels, shape):
    gu, dn = int4_kernel.random_blobs(*shape, experts=5)
    ids = torch.tensor([4, 1, 3, 0], dtype=torch.int32)  # unsorted, slot 2 unused
    for count in (1, 3, 16):
        x = tokens(count, shape[0])
        errors = rel_errors(kernels.grouped_int4_expert_forward(x, gu, dn, ids),
                            eager_refs(x, gu, dn, ids.tolist()))
        assert max(errors) < TOL, (count, errors)


def test_quantised_weights_and_strided_slots(kernels):
    """Blobs as int4.quantize writes them, in slots with a larger stride than one blob: every
    other slot of a bigger tensor, and slots followed by NaN padding (read by mistake, it would
    turn an output into NaN)."""
    hidden, width = SHAPES[0]
    gen = torch.Generator().manual_seed(3)
    gu = torch.stack([int4.quantize(torch.randn(2 * width, hidden, generator=gen)) for _ in range(6)])
    dn = torch.stack([int4.quantize(torch.randn(hidden, width, generator=gen)) for _ in range(6)])
    x, ids = tokens(3, hidden), torch.tensor([2, 0], dtype=torch.int32)
    refs = eager_refs(x, gu[::2], dn[::2], ids.tolist())
    for gu_slots, dn_slots in ((gu[::2], dn[::2]), (padded(gu[::2]), padded(dn[::2]))):
        assert gu_slots.stride(0) > gu_slots[0].numel()
        errors = rel_errors(kernels.grouped_int4_expert_forward(x, gu_slots, dn_slots, ids), refs)
        assert max(errors) < TOL, errors
    single = kernels.int4_expert_forward(x, padded(gu)[4], padded(dn)[4])
    assert max(rel_errors(single[None], refs[:1])) < TOL


def test_a_wrong_scale_offset_or_slot_is_caught(kernels):
    hidden, width = SHAPES[0]
    gu, dn = int4_kernel.random_blobs(hidden, width, experts=6)
    x, ids = tokens(2, hidden), torch.tensor([4, 1, 5, 0], dtype=torch.int32)
    refs = eager_refs(x, gu, dn, ids.tolist())

    def flags(gate_up, down, slot_ids):
        errors = rel_errors(kernels.grouped_int4_expert_forward(x, gate_up, down, slot_ids), refs)
        return [e > TOL for e in errors]

    assert flags(gu, dn, ids) == [False] * 4
    wrong = dn.clone()
    int4.split(wrong[5])[1].mul_(1.1)  # the down scales and offsets of slot 5, 10% off
    assert flags(gu, wrong, ids) == [False, False, True, False]
    wrong = gu.clone()
    int4.split(wrong[1])[1][..., 1].neg_()  # the gate_up offsets of slot 1
    assert flags(wrong, dn, ids) == [False, True, False, False]
    assert flags(gu, dn, ids[[1, 0, 2, 3]]) == [True, True, False, False]  # two slots swapped


@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_self_test_passes_and_catches_a_broken_kernel(kernels, monkeypatch, caplog, grouped):
    assert_self_test_catches_broken_kernels(kernels, SHAPES[0], grouped, monkeypatch, caplog, "int4")


def test_production_never_uses_the_interpreter(kernels):
    assert_production_never_interprets(int4_kernel, kernels, SHAPES[0])


def test_bad_calls_are_refused(kernels):
    hidden, width = SHAPES[0]
    gu, dn = int4_kernel.random_blobs(hidden, width, experts=2)
    x, ids = tokens(1, hidden), torch.tensor([0, 1], dtype=torch.int32)
    forward = kernels.grouped_int4_expert_forward
    with pytest.raises(ValueError, match="tokens"):
        forward(tokens(kernels.MAX_TOKENS + 1, hidden), gu, dn, ids)
    with pytest.raises(ValueError, match="tokens"):
        forward(x.float(), gu, dn, ids)
    with pytest.raises(ValueError, match="not an int4 blob width"):
        forward(x, gu[..., :-4], dn, ids)
    with pytest.raises(ValueError, match="uint8 blobs"):
        forward(x, gu.view(torch.int8), dn, ids)
    with pytest.raises(ValueError, match="does not fit"):
        forward(tokens(1, 2 * hidden), gu, dn, ids)
    with pytest.raises(ValueError, match="2 gate_up slots but 1"):
        forward(x, gu, dn[:1], ids)
    unaligned = torch.zeros(2 * gu.numel() + 2, dtype=torch.uint8)[2:2 + gu.numel()].view(gu.shape)
    with pytest.raises(ValueError, match="4-byte aligned"):
        forward(x, unaligned, dn, ids)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.int4_expert_forward(x, gu[0].t().contiguous().t(), dn[0])


def test_the_kernel_compiles_for_hopper(monkeypatch, tmp_path):
    """The production (bf16 tensor-core) kernel through Triton's whole pipeline to an sm_90
    cubin, with the 16-byte divisibility Triton infers at launch for aligned pointers and
    strides: type errors, illegal dot shapes or a register blow-up would fail here."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    signature = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*i32", "y_ptr": "*bf16",
                 "ids_ptr": "*i32", **dict.fromkeys(
                     ["M", "N", "K", "stride_xe", "stride_xm", "stride_ws", "stride_ss",
                      "stride_ye", "stride_ym"], "i32")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "M"}
    for indexed, gated in ((True, False), (False, True)):  # grouped gate_up, single down
        constants = {"INDEXED": indexed, "GATED": gated, "DOT_DTYPE": triton.language.bfloat16,
                     "BLOCK_M": int4_kernel.BLOCK_M, "ROWS": int4.ROW_BLOCK, "GROUP": int4.GROUP}
        source = ASTSource(int4_kernel._int4_matmul_kernel,
                           {**signature, **dict.fromkeys(constants, "constexpr")}, constants, aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": int4_kernel.NUM_WARPS, "num_stages": int4_kernel.NUM_STAGES,
            "enable_fp_fusion": int4_kernel.ENABLE_FP_FUSION})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and "mma" in ptx
        assert "ld.global.v4" in ptx or "cp.async" in ptx  # the codes in wide loads


@pytest.mark.cuda
def test_kernels_on_the_gpu():
    device = torch.device("cuda", 0)
    assert int4_kernel.kernel_usable(device, 256, 128)
    assert int4_kernel.grouped_kernel_usable(device, 256, 128)
    hidden, width = 512, 192
    gu, dn = (padded(t.to(device)) for t in int4_kernel.random_blobs(hidden, width, experts=8))
    ids = torch.tensor([6, 1, 3, 0], dtype=torch.int32, device=device)
    for count in (1, 4, 16):
        x = tokens(count, hidden).to(device)
        refs = eager_refs(x, gu, dn, ids.tolist())
        errors = rel_errors(int4_kernel.grouped_int4_expert_forward(x, gu, dn, ids), refs)
        assert max(errors) < TOL, (count, errors)
        single = torch.stack([int4_kernel.int4_expert_forward(x, gu[i], dn[i])
                              for i in ids.tolist()])
        assert max(rel_errors(single, refs)) < TOL

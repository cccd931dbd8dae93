"""The NVFP4 expert kernel (engine/experts/nvfp4_kernel.py) without a GPU.

As for the int4 kernel (tests/engine/experts/test_int4_kernel.py): a private copy of the module
runs its kernel under Triton's interpreter on CPU tensors, with fp32 dot operands (every E2M1
value and every bf16 activation is exact in both); the bf16 tensor-core build is covered by
compiling it for sm_90 here and by the cuda-marked test.

Tolerance: 4% of the largest output of each expert, as for the int4 kernel. The kernel computes
with the exact dequantised weights (e4m3 * (x . e2m1) per group, divided by the row's divisor,
in fp32) where the eager reference rounds every weight to bf16 (<= 2^-9 each) and then the
gate_up output, hidden and output as the kernel does; the interpreter's fp32 -> bf16
conversion truncates at those three points where the GPU rounds to nearest. Observed under
the interpreter: up to 3.0% over 300 expert outputs of the shapes below, 1 to 16 tokens (mean
1.6%), as for the int4 kernel. A divisor 10% off, the nibbles of a byte read in the wrong
order, a scale of the wrong group or a wrong slot or divisor row must show, and the tests below
check that they do.
"""

from __future__ import annotations

import pytest
import torch

from engine.experts import nvfp4, nvfp4_kernel
from tests.helpers.triton_interpreter import (
    QUIET_INTERPRETER,
    assert_production_never_interprets,
    assert_self_test_catches_broken_kernels,
    interpreted_kernels,
    rel_errors,
    tokens,
)

TOL = 0.04
# (H, I): several row blocks and steps (8 and 4 groups a step), and K of 5 and 3 groups (one
# group a step) with rows that end mid-block
SHAPES = [(128, 64), (64, 128), (80, 48)]
pytestmark = QUIET_INTERPRETER


kernels = interpreted_kernels(nvfp4_kernel)  # a private copy whose kernels run under the interpreter


@pytest.fixture
def small_blocks(kernels, monkeypatch):
    """32-row blocks and at most 2 groups a step: several of each on the small shapes."""
    monkeypatch.setattr(kernels, "BLOCK_N", 32)
    monkeypatch.setattr(kernels, "MAX_GROUPS", 2)
    return kernels


def eager_refs(x, gu, gu_d, dn, dn_d, experts) -> list[torch.Tensor]:
    """The eager outputs of `experts` (indices into blobs and divisor tables alike)."""
    return [nvfp4_kernel.eager(x, gu[e], gu_d[e], dn[e], dn_d[e]) for e in experts]


def as_bytes(blobs: torch.Tensor) -> torch.Tensor:
    return blobs.view(torch.uint8)


def padded(slots: torch.Tensor, pad: int = 36) -> torch.Tensor:
    """slots [S, N, W] as a view of a buffer with `pad` bytes of 0xFF (as scales: E4M3 NaN)
    after each."""
    s, n, w = slots.shape
    wide = torch.full((s, n * w + pad), 0xFF, dtype=torch.uint8, device=slots.device)
    wide[:, :n * w] = as_bytes(slots).reshape(s, -1)
    return wide[:, :n * w].view(s, n, w).view(slots.dtype)


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_single_expert_kernel_matches_the_eager_path(kernels, shape):
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(*shape, experts=2)
    for count, view in ((1, False), (5, True), (16, False)):  # blobs as shipped, or as bytes
        x = tokens(count, shape[0])
        blobs = (as_bytes(gu), as_bytes(dn)) if view else (gu, dn)
        ours = torch.stack([kernels.nvfp4_expert_forward(x, blobs[0][e], gu_d[e], blobs[1][e],
                                                         dn_d[e]) for e in (1, 0)])
        errors = rel_errors(ours, eager_refs(x, gu, gu_d, dn, dn_d, (1, 0)))
        assert max(errors) < TOL, (count, errors)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_grouped_kernel_matches_the_eager_path(kernels, shape):
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(*shape, experts=5)
    slot_ids = ids(4, 1, 3, 0)  # unsorted, slot 2 unused
    for count in (1, 3, 16):
        x = tokens(count, shape[0])
        ours = kernels.grouped_nvfp4_expert_forward(x, gu, dn, slot_ids, gu_d, dn_d, slot_ids)
        errors = rel_errors(ours, eager_refs(x, gu, gu_d, dn, dn_d, slot_ids.tolist()))
        assert max(errors) < TOL, (count, errors)


def test_several_row_blocks_and_steps(small_blocks):
    """Ragged row blocks (96 and 80 rows in blocks of 32) and K in steps of 2 groups and of 1."""
    hidden, width = 80, 48
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(hidden, width, experts=3)
    x = tokens(4, hidden)
    ours = small_blocks.grouped_nvfp4_expert_forward(x, gu, dn, ids(2, 0), gu_d, dn_d, ids(2, 0))
    assert max(rel_errors(ours, eager_refs(x, gu, gu_d, dn, dn_d, (2, 0)))) < TOL
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(64, 128, experts=1)
    x = tokens(2, 64)
    single = small_blocks.nvfp4_expert_forward(x, gu[0], gu_d[0], dn[0], dn_d[0])
    assert max(rel_errors(single[None], eager_refs(x, gu, gu_d, dn, dn_d, (0,)))) < TOL


def test_grouped_kernel_reads_divisors_by_expert_id(kernels):
    """As the offload cache calls it: slot s holds some expert e != s, and the kernel reads e's
    row of the layer's divisor tables itself (a slot's index would give the wrong divisors)."""
    hidden, width = SHAPES[0]
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(hidden, width, experts=6)
    holds = torch.tensor([3, 5, 0, 4, 1, 2])  # slot -> the expert it holds
    # (PyTorch cannot gather float4_e2m1fn_x2 elements: the bytes can be)
    slots_gu, slots_dn = (as_bytes(t)[holds].view(nvfp4.BLOB_DTYPE) for t in (gu, dn))
    slot_ids = ids(1, 4, 2)
    expert_ids = holds[slot_ids.long()].to(torch.int32)  # experts 5, 1, 0
    x = tokens(2, hidden)
    forward = kernels.grouped_nvfp4_expert_forward
    refs = eager_refs(x, gu, gu_d, dn, dn_d, expert_ids.tolist())
    ours = forward(x, slots_gu, slots_dn, slot_ids, gu_d, dn_d, expert_ids)
    assert max(rel_errors(ours, refs)) < TOL
    by_slot = forward(x, slots_gu, slots_dn, slot_ids, gu_d, dn_d, slot_ids)
    assert min(rel_errors(by_slot, refs)) > TOL  # every expert's divisors are then another's
    with pytest.raises(ValueError, match="expert ids for 2 experts, slot ids for 3"):
        forward(x, slots_gu, slots_dn, slot_ids, gu_d, dn_d, expert_ids[:2])


def quantised_expert(hidden: int, width: int, gen: torch.Generator):
    """(gate_up blob, its divisors, down blob, its divisors) as the release ships an expert:
    gate (w1) and up (w3) quantised each with its own global divisor."""
    def matrix(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scales, divisor = nvfp4.quantize(torch.randn(rows, cols, generator=gen))
        blob = torch.empty(rows, nvfp4.blob_width(cols), dtype=nvfp4.BLOB_DTYPE)
        nvfp4.pack(packed, scales, blob)
        return blob, divisor.expand(rows)

    (gate, gate_d), (up, up_d), (down, down_d) = (matrix(width, hidden), matrix(width, hidden),
                                                  matrix(hidden, width))
    return torch.cat([gate, up]), torch.cat([gate_d, up_d]), down, down_d


def test_quantised_weights_and_strided_slots(kernels):
    """Blobs as nvfp4.quantize and pack write them, in slots with a larger stride than one
    blob: every other slot of a bigger tensor, and slots followed by NaN padding (read by
    mistake, it would turn an output into NaN)."""
    hidden, width = SHAPES[0]
    gen = torch.Generator().manual_seed(3)
    experts = [quantised_expert(hidden, width, gen) for _ in range(6)]
    gu, gu_d, dn, dn_d = (torch.stack(parts) for parts in zip(*experts, strict=True))
    x, slot_ids = tokens(3, hidden), ids(2, 0)
    refs = eager_refs(x, gu[::2], gu_d[::2], dn[::2], dn_d[::2], slot_ids.tolist())
    for gu_slots, dn_slots in ((gu[::2], dn[::2]), (padded(gu[::2]), padded(dn[::2]))):
        assert gu_slots.stride(0) > gu_slots[0].numel()
        ours = kernels.grouped_nvfp4_expert_forward(x, gu_slots, dn_slots, slot_ids, gu_d[::2],
                                                    dn_d[::2], slot_ids)
        assert max(rel_errors(ours, refs)) < TOL
    single = kernels.nvfp4_expert_forward(x, padded(gu)[4], gu_d[4], padded(dn)[4], dn_d[4])
    assert max(rel_errors(single[None], refs[:1])) < TOL


def test_a_wrong_divisor_nibble_order_scale_or_slot_is_caught(kernels):
    hidden, width = SHAPES[0]
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(hidden, width, experts=6)
    x, slot_ids = tokens(2, hidden), ids(4, 1, 5, 0)
    refs = eager_refs(x, gu, gu_d, dn, dn_d, slot_ids.tolist())

    def flags(gate_up, gate_up_div, down, down_div, slots=slot_ids):
        ours = kernels.grouped_nvfp4_expert_forward(x, gate_up, down, slots, gate_up_div,
                                                    down_div, slot_ids)
        return [e > TOL for e in rel_errors(ours, refs)]

    assert flags(gu, gu_d, dn, dn_d) == [False] * 4
    wrong = dn_d.clone()
    wrong[5] *= 1.1  # the down divisors of expert 5, 10% off
    assert flags(gu, gu_d, dn, wrong) == [False, False, True, False]
    wrong = gu.clone()
    codes = nvfp4.codes_and_scales(wrong[1])[0]
    codes.copy_((codes << 4) | (codes >> 4))  # slot 1's gate_up nibbles swapped in every byte
    assert flags(wrong, gu_d, dn, dn_d) == [False, True, False, False]
    wrong = dn.clone()
    scales = nvfp4.codes_and_scales(wrong[0])[1].view(torch.uint8)
    scales.copy_(scales.roll(1, dims=1))  # slot 0's down scales, each one group off
    assert flags(gu, gu_d, wrong, dn_d) == [False, False, False, True]
    assert flags(gu, gu_d, dn, dn_d, slot_ids[[1, 0, 2, 3]]) == [True, True, False, False]


@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_self_test_passes_and_catches_a_broken_kernel(kernels, monkeypatch, caplog, grouped):
    assert_self_test_catches_broken_kernels(kernels, SHAPES[0], grouped, monkeypatch, caplog, "NVFP4")


def test_production_never_uses_the_interpreter(kernels):
    assert_production_never_interprets(nvfp4_kernel, kernels, SHAPES[0])
    with pytest.raises(ValueError, match="not int4"):
        nvfp4_kernel.kernel_usable(torch.device("cpu"), *SHAPES[0], fmt="int4")


def test_random_blobs_are_valid_and_of_order_one():
    """Every code value in both nibbles, finite positive scales (no NaN byte), outputs of
    order 1."""
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(128, 64, experts=2)
    assert gu.dtype == dn.dtype == nvfp4.BLOB_DTYPE and gu_d.dtype == dn_d.dtype == torch.float32
    assert gu.shape == (2, 128, nvfp4.blob_width(128)) and dn_d.shape == (2, 128)
    codes, scales = nvfp4.codes_and_scales(gu[0])
    for nibble in (codes & 15, codes >> 4):
        assert set(nibble.unique().tolist()) == set(range(16))
    assert scales.float().isfinite().all() and (scales.float() > 0).all()
    out = nvfp4_kernel.eager(tokens(4, 128), gu[0], gu_d[0], dn[0], dn_d[0])
    assert 0.1 < float(out.float().abs().max()) < 30


def test_bad_calls_are_refused(kernels):
    hidden, width = SHAPES[0]
    gu, gu_d, dn, dn_d = nvfp4_kernel.random_blobs(hidden, width, experts=2)
    x, slot_ids = tokens(1, hidden), ids(0, 1)
    forward = kernels.grouped_nvfp4_expert_forward

    def refused(message, *args, x=x, **kwargs):
        call = dict(gate_up_slots=gu, down_slots=dn, slot_ids=slot_ids, gate_up_div=gu_d,
                    down_div=dn_d, expert_ids=slot_ids)
        with pytest.raises(ValueError, match=message):
            forward(x, **(call | kwargs))

    refused("tokens", x=tokens(kernels.MAX_TOKENS + 1, hidden))
    refused("tokens", x=x.float())
    refused("not an NVFP4 blob width", gate_up_slots=as_bytes(gu)[..., :-4])
    refused("float4_e2m1fn_x2", gate_up_slots=as_bytes(gu).view(torch.int8))
    refused("float4_e2m1fn_x2", down_slots=dn[0])
    refused("does not fit", x=tokens(1, 2 * hidden))
    refused("2 gate_up slots but 1", down_slots=dn[:1])
    refused(r"gate_up divisors must be floating point \[experts, 128\]", gate_up_div=gu_d[:, :-1])
    refused("down divisors", down_div=dn_d[0])
    refused("down divisors", down_div=dn_d.to(torch.int32))
    refused("expert ids for 1", expert_ids=slot_ids[:1])
    with pytest.raises(ValueError, match="contiguous"):
        kernels.nvfp4_expert_forward(x, as_bytes(gu[0]).t().contiguous().t(), gu_d[0], dn[0],
                                     dn_d[0])
    with pytest.raises(ValueError, match=r"gate_up divisors .* \[128\], got \(1,\)"):
        kernels.nvfp4_expert_forward(x, gu[0], gu_d[0, :1], dn[0], dn_d[0])


def test_the_kernel_compiles_for_hopper(monkeypatch, tmp_path):
    """The production (bf16 tensor-core) kernel through Triton's whole pipeline to an sm_90
    cubin, with the 16-byte divisibility Triton infers at launch for aligned pointers and
    strides: type errors, illegal dot shapes or a register blow-up would fail here. The row
    divisor is an IEEE division (tl.div_rn), never an approximate one."""
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    signature = {"x_ptr": "*bf16", "w_ptr": "*u8", "d_ptr": "*fp32", "y_ptr": "*bf16",
                 "ids_ptr": "*i32", "eids_ptr": "*i32", **dict.fromkeys(
                     ["M", "N", "K", "stride_xe", "stride_xm", "stride_ws", "stride_wn",
                      "stride_de", "stride_ye", "stride_ym"], "i32")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name != "M"}
    for indexed, gated in ((True, False), (False, True)):  # grouped gate_up, single down
        constants = {"INDEXED": indexed, "GATED": gated, "DOT_DTYPE": triton.language.bfloat16,
                     "BLOCK_M": nvfp4_kernel.BLOCK_M, "BLOCK_N": nvfp4_kernel.BLOCK_N,
                     "GROUP": nvfp4.GROUP, "GROUPS": nvfp4_kernel.MAX_GROUPS}
        source = ASTSource(nvfp4_kernel._nvfp4_matmul_kernel,
                           {**signature, **dict.fromkeys(constants, "constexpr")}, constants, aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": nvfp4_kernel.NUM_WARPS, "num_stages": nvfp4_kernel.NUM_STAGES,
            "enable_fp_fusion": nvfp4_kernel.ENABLE_FP_FUSION})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and "mma" in ptx and "div.rn.f32" in ptx
        assert "cp.async" in ptx  # the code tiles in pipelined loads


@pytest.mark.cuda
def test_kernels_on_the_gpu():
    device = torch.device("cuda", 0)
    assert nvfp4_kernel.kernel_usable(device, 256, 128)
    assert nvfp4_kernel.grouped_kernel_usable(device, 256, 128)
    hidden, width = 512, 176  # 352 gate_up rows: a ragged row block; K of 11 groups
    gu, gu_d, dn, dn_d = (t.to(device) for t in
                          nvfp4_kernel.random_blobs(hidden, width, experts=8))
    gu, dn = padded(gu), padded(dn)
    slot_ids = torch.tensor([6, 1, 3, 0], dtype=torch.int32, device=device)
    for count in (1, 4, 16):
        x = tokens(count, hidden).to(device)
        refs = eager_refs(x, gu, gu_d, dn, dn_d, slot_ids.tolist())
        ours = nvfp4_kernel.grouped_nvfp4_expert_forward(x, gu, dn, slot_ids, gu_d, dn_d, slot_ids)
        assert max(rel_errors(ours, refs)) < TOL, (count, rel_errors(ours, refs))
        single = torch.stack([nvfp4_kernel.nvfp4_expert_forward(x, gu[i], gu_d[i], dn[i], dn_d[i])
                              for i in slot_ids.tolist()])
        assert max(rel_errors(single, refs)) < TOL

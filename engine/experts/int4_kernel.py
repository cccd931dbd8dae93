"""A Triton kernel for decode-sized expert matmuls straight from int4 blobs (engine/experts/int4.py:
4-bit codes with a bf16 scale and offset per group of 64 inputs, codes and scales in one blob).

Why: at M <= 16 tokens an expert matmul is a pass over its weights, and the int4 blob is 0.56x
the FP8 bytes, so reading it as it is (no dequantised bf16 copy, 3.6x the bytes, written and read
again) is what makes the smaller format faster as well as smaller. The design follows
fp8_kernel.py: one kernel, two launches per API (gate_up, then down with SiLU(gate) * up fused
into the load of its input), a 2-D grid (row blocks, experts) for the grouped API.

Each program owns one 64-row block of the code layout (rows 64b + j in the low nibbles, 64b + 32
+ j in the high ones) and steps through K one group at a time, so each step reads 2 KB of codes
that lie contiguous in the blob and one (scale, offset) pair per row. Per group,
    x . w = scale * (x . (code - 8)) + offset * sum(x),
so the dot runs on exact small integers (code - 8 is exact in bf16, each product exact in fp32)
and the scales are applied once per group in fp32. That is the exact dequantised weight, where
the eager path rounds each weight to bf16 first (relative error <= 2^-9 per weight): the two
differ by that rounding and the fp32 accumulation order, well inside the self-test's tolerance.

Imports cleanly without Triton or CUDA (KERNEL_AVAILABLE is then False). Before first use on a
device each API is checked against the eager path (int4.dequantize + expert_forward); any
mismatch or error disables it, so a kernel problem costs speed, never correctness. Tests run the
kernel under Triton's interpreter with fp32 dot operands (it has no bf16 arithmetic; every code
and bf16 activation is exact in both), see fp8_kernel.py. Production never uses the interpreter.
Glossary: M tokens (<= 16 in decode), N output rows, K input width, H hidden, I expert width,
W blob bytes per row, S cache slots, n experts selected for the token(s), e one of them.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from engine.experts import int4
from engine.experts.compute import expert_forward
from engine.experts.fp8_kernel import (
    BLOCK_M,
    ENABLE_FP_FUSION,
    NUM_STAGES,
    NUM_WARPS,
    TRITON_IMPORTED,
    agrees_with_eager,
    usable_once,
)
from engine.experts.fp8_kernel import MAX_TOKENS as MAX_TOKENS  # re-exported for callers
from engine.experts.fp8_kernel import _check_tokens as check_tokens

log = logging.getLogger(__name__)

_checked: dict[tuple[torch.device, bool], bool] = {}

if TRITON_IMPORTED:  # decorating is cheap; tests also compile it for sm_90 without a GPU
    import triton
    import triton.language as tl

    @triton.jit
    def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, ids_ptr, M, N, K, stride_xe, stride_xm,
                            stride_ws, stride_ss, stride_ye, stride_ym,
                            INDEXED: tl.constexpr, GATED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                            BLOCK_M: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr):
        """y[e] = x[e] @ w[slot_e]^T for expert e = program_id(1), rows ROWS * program_id(0) ..
        + ROWS. w is the slots as bytes, s the same memory as int32: one word per (scale, offset)
        pair of bf16s, so a row's pair is one load and each bf16 becomes fp32 by a shift.
        slot_e is ids[e] (INDEXED) or e. GATED: x[e] is [M, 2K] = [gate | up] and the input is
        bf16(bf16(silu(gate)) * up), rounded as the eager path rounds."""
        HALF: tl.constexpr = ROWS // 2
        b = tl.program_id(0).to(tl.int64)
        e = tl.program_id(1)
        slot = tl.load(ids_ptr + e).to(tl.int64) if INDEXED else e.to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, GROUP)
        offs_j = tl.arange(0, HALF)
        m_mask = offs_m[:, None] < M
        x_rows = x_ptr + e * stride_xe + offs_m[:, None] * stride_xm + offs_k[None, :]
        # codes (b, k, j) at byte b*K*HALF + k*HALF + j; then pairs [K/GROUP, N] (4 bytes each)
        codes = w_ptr + slot * stride_ws + b * K * HALF + offs_k[:, None] * HALF + offs_j[None, :]
        pairs = s_ptr + slot * stride_ss + N * K // 8 + b * ROWS + offs_j
        acc_lo = tl.full((BLOCK_M, HALF), 0.0, tl.float32)  # builtins only, see GATED
        acc_hi = tl.full((BLOCK_M, HALF), 0.0, tl.float32)
        ones = tl.full((GROUP, HALF), 1.0, DOT_DTYPE)
        for k0 in range(0, K, GROUP):
            x = tl.load(x_rows + k0, mask=m_mask, other=0.0)  # bf16
            if GATED:
                gate = x.to(tl.float32)
                up = tl.load(x_rows + K + k0, mask=m_mask, other=0.0).to(tl.float32)
                # silu spelt out: tl.sigmoid (like tl.zeros) is itself @jit, which the tests'
                # interpreter cannot call (Triton was imported before they switched it on).
                x = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32) * up
            x = x.to(tl.bfloat16).to(DOT_DTYPE)
            # sum(x) for the offsets, by a dot: exact products, fp32 sums, and no tl.sum (@jit)
            x_sum = tl.dot(x, ones)  # [BM, HALF], every column the same
            byte = tl.load(codes + k0 * HALF)  # uint8 [GROUP, HALF]
            lo = ((byte & 15).to(tl.float32) - 8.0).to(DOT_DTYPE)
            hi = ((byte >> 4).to(tl.float32) - 8.0).to(DOT_DTYPE)
            pair_lo = tl.load(pairs + (k0 // GROUP) * N)[None, :]  # int32, rows 64b + j
            pair_hi = tl.load(pairs + (k0 // GROUP) * N + HALF)[None, :]  # rows 64b + 32 + j
            # little-endian: the scale is the low half, the offset the high half
            acc_lo += tl.dot(x, lo) * (pair_lo << 16).to(tl.float32, bitcast=True) \
                + x_sum * (pair_lo & -65536).to(tl.float32, bitcast=True)
            acc_hi += tl.dot(x, hi) * (pair_hi << 16).to(tl.float32, bitcast=True) \
                + x_sum * (pair_hi & -65536).to(tl.float32, bitcast=True)
        y = y_ptr + e * stride_ye + offs_m[:, None] * stride_ym + b * ROWS + offs_j[None, :]
        tl.store(y, acc_lo.to(tl.bfloat16), mask=m_mask)
        tl.store(y + HALF, acc_hi.to(tl.bfloat16), mask=m_mask)

    # The interpreter's triton.jit returns its own kind of function: this module's kernels run
    # under it exactly when this flag is set (a test's private copy, never production).
    INTERPRETED = not isinstance(_int4_matmul_kernel, triton.runtime.JITFunction)
else:  # pragma: no cover - depends on the torch build
    INTERPRETED = False
KERNEL_AVAILABLE = TRITON_IMPORTED and (torch.cuda.is_available() or INTERPRETED)


def _check_slots(slots: torch.Tensor) -> tuple[int, int]:
    """(N, K) of slots uint8 [S, N, W], each slot's blob contiguous (the slot stride is free)."""
    if slots.dtype != torch.uint8 or slots.dim() != 3:
        raise ValueError(f"int4 kernel takes uint8 blobs, got {tuple(slots.shape)} {slots.dtype}")
    n, k = int4.matrix_shape(slots)  # refuses a width that is not an int4 blob's
    int4.check_shape(n, k)
    if slots.stride(2) != 1 or slots.stride(1) != slots.shape[2]:
        raise ValueError("int4 kernel needs each slot's blob contiguous")
    if slots.stride(0) % 4 or slots.storage_offset() % 4:  # the scales are read as int32
        raise ValueError("int4 kernel needs slots at 4-byte aligned offsets")
    return n, k


def _check_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Both matrices' blobs valid and of one expert whose hidden size is x's."""
    (gu_n, gu_k), (dn_n, dn_k) = _check_slots(gate_up), _check_slots(down)
    if gu_k != x.shape[1] or dn_n != x.shape[1] or gu_n != 2 * dn_k:
        raise ValueError(f"int4 expert of gate_up {gu_n}x{gu_k} and down {dn_n}x{dn_k} does not "
                         f"fit tokens of width {x.shape[1]}")
    if gate_up.shape[0] != down.shape[0]:
        raise ValueError(f"{gate_up.shape[0]} gate_up slots but {down.shape[0]} down slots")


def _launch(x: torch.Tensor, slots: torch.Tensor, slot_ids: torch.Tensor | None,
            gated: bool) -> torch.Tensor:
    """One launch for n experts -> [n, M, N] bf16.

    x [M, K] bf16 (shared by all experts) or [n, M, 2K] (gated: per expert), K-contiguous;
    slots uint8 [S, N, W] (checked by _check_slots); slot_ids int32 [n] or None (expert e is
    slot e, n = S).
    """
    rows, k = int4.matrix_shape(slots)
    n = slots.shape[0] if slot_ids is None else slot_ids.shape[0]
    m = x.shape[-2]
    y = torch.empty((n, m, rows), dtype=torch.bfloat16, device=x.device)
    pairs = slots.view(torch.int32)  # the same bytes: the kernel reads each slot's tail
    grid = (rows // int4.ROW_BLOCK, n)
    # Triton launches on the current device's current stream, not on the tensors' device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _int4_matmul_kernel[grid](
            x, slots, pairs, y, slots if slot_ids is None else slot_ids, m, rows, k,
            x.stride(0) if x.dim() == 3 else 0, x.stride(-2), slots.stride(0), pairs.stride(0),
            y.stride(0), y.stride(1), INDEXED=slot_ids is not None, GATED=gated,
            DOT_DTYPE=tl.float32 if INTERPRETED else tl.bfloat16, BLOCK_M=BLOCK_M,
            ROWS=int4.ROW_BLOCK, GROUP=int4.GROUP, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            enable_fp_fusion=ENABLE_FP_FUSION)
    return y


def int4_expert_forward(x: torch.Tensor, gate_up_blob: torch.Tensor,
                        down_blob: torch.Tensor) -> torch.Tensor:
    """One expert's SiLU-gated MLP straight from its int4 blobs. x [t <= MAX_TOKENS, H] bf16;
    gate_up_blob uint8 [2I, W(H)] and down_blob [H, W(I)] on x's device -> [t, H] bf16."""
    x = check_tokens(x)
    gate_up, down = gate_up_blob[None], down_blob[None]
    _check_expert(x, gate_up, down)
    return _launch(_launch(x, gate_up, None, gated=False), down, None, gated=True)[0]


def grouped_int4_expert_forward(x: torch.Tensor, gate_up_slots: torch.Tensor,
                                down_slots: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Every selected expert's SiLU-gated MLP on the same tokens, in two launches.

    x [M <= MAX_TOKENS, H] bf16; gate_up_slots uint8 [S, 2I, W(H)] and down_slots [S, H, W(I)],
    one blob per slot (the slot stride may exceed a blob); slot_ids int32 [n] naming the slots to
    use, on x's device (in range: never checked, it would cost a device sync). -> [n, M, H]
    bf16, unweighted: the caller applies the routing weights and sums in its fixed order.
    """
    x = check_tokens(x)
    _check_expert(x, gate_up_slots, down_slots)
    ids = slot_ids.to(device=x.device, dtype=torch.int32).contiguous()
    gu = _launch(x, gate_up_slots, ids, gated=False)
    return _launch(gu, down_slots, ids, gated=True)


def kernel_usable(device: torch.device, hidden: int, width: int, fmt: str = "int4",
                  grouped: bool = False) -> bool:
    """True once int4_expert_forward (or, grouped, grouped_int4_expert_forward) has matched the
    eager path on `device` (checked once). `fmt` must be "int4" (the FP8 kernels' signature)."""
    if fmt != "int4":
        raise ValueError(f"the int4 kernel reads int4 blobs, not {fmt}")
    return usable_once(_checked, device, grouped, INTERPRETED,
                       lambda: _self_test(device, hidden, width, grouped))


def grouped_kernel_usable(device: torch.device, hidden: int, width: int, fmt: str = "int4") -> bool:
    return kernel_usable(device, hidden, width, fmt, grouped=True)


def random_blobs(hidden: int, width: int, experts: int = 3,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, W(H)], down [E, H, W(I)]): distinct random int4 experts, built as bytes
    (every code value, scales and offsets of mixed size and sign, outputs of order 1) without
    quantising, which would cost seconds at a model's size. On the CPU, seeded."""
    gen = torch.Generator().manual_seed(seed)

    def blob(rows: int, cols: int) -> torch.Tensor:
        codes = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, generator=gen)
        scale = (torch.rand(cols // int4.GROUP, rows, generator=gen) + 0.5) * 0.2 * cols**-0.5
        offset = torch.randn(cols // int4.GROUP, rows, generator=gen) * 0.5 * cols**-0.5
        pairs = torch.stack([scale, offset], dim=-1).to(torch.bfloat16)  # [G, N, 2]
        return torch.cat([codes, pairs.view(torch.uint8).reshape(-1)]).view(rows, -1)

    return (torch.stack([blob(2 * width, hidden) for _ in range(experts)]),
            torch.stack([blob(hidden, width) for _ in range(experts)]))


def eager(x: torch.Tensor, gate_up_blob: torch.Tensor, down_blob: torch.Tensor) -> torch.Tensor:
    """The reference: dequantise to bf16, then the eager expert MLP."""
    return expert_forward(x, int4.dequantize(gate_up_blob, torch.bfloat16),
                          int4.dequantize(down_blob, torch.bfloat16))


def _self_test(device: torch.device, hidden: int, width: int, grouped: bool) -> bool:
    try:
        x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
        x = x.to(device, torch.bfloat16)
        gu, dn = (t.to(device) for t in random_blobs(hidden, width))
        ids = [2, 0]  # out of order, slot 1 skipped
        if grouped:
            ours = grouped_int4_expert_forward(x, gu, dn, torch.tensor(ids, dtype=torch.int32,
                                                                       device=device))
        else:
            ours = torch.stack([int4_expert_forward(x, gu[i], dn[i]) for i in ids])
        return agrees_with_eager(ours, [eager(x, gu[i], dn[i]) for i in ids],
                                 f"{'grouped' if grouped else 'single'} int4 expert kernel")
    except Exception as exc:  # a compiler or driver problem: fall back to the eager path
        log.warning("int4 expert kernel unavailable on %s (%s): using the eager path", device, exc)
        return False

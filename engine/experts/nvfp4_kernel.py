"""A Triton kernel for decode-sized expert matmuls straight from NVFP4 blobs (engine/experts/
nvfp4.py: E2M1 codes with an E4M3 scale per group of 16 inputs, codes and scales in one blob
row, and a per-row fp32 global divisor beside it).

Why: as for int4 (engine/experts/int4_kernel.py), at M <= 16 tokens an expert matmul is a pass
over its weights, and the blob is 0.56x the FP8 bytes; reading it as it is (no dequantised bf16
copy, 3.6x the bytes) is what makes the smaller format faster as well as smaller. One kernel,
two launches per API (gate_up, then down with SiLU(gate) * up fused into the load of its
input), a 2-D grid (row blocks, experts) for the grouped API, as in fp8_kernel.py.

Each program owns BLOCK_N rows of the blob (row-major: a row's K/2 code bytes, then its K/16
scale bytes) and steps through K by GROUPS groups of 16 inputs, each group one [BLOCK_N, 16]
byte tile (a row's 8 code bytes twice: low nibbles, then high, the inputs read in that order)
and one scale byte a row.
Per group and row n,
    x . w = e4m3(scale) * (x . e2m1(codes)) / d[n],
so the dot runs on E2M1 values (exact in bf16; each product with a bf16 activation exact in
fp32), each group's partial sum is multiplied by its E4M3 scale in fp32, and the row's divisor
is applied once at the end (one IEEE division a row where e4m3 / d per group would be one a
group: the same value up to fp32 rounding). That is the exact dequantised weight, where the
eager path rounds each weight to bf16 first (relative error <= 2^-9 per weight): the two differ
by that rounding and the fp32 accumulation order, well inside the self-test's tolerance.
Codes and scales are decoded on their bits (_e2m1, _e4m3: exact, no FP8 instructions), so the
kernel needs no E4M3 support from the GPU (pre-sm_89 GPUs run it too).

Imports cleanly without Triton or CUDA (KERNEL_AVAILABLE is then False). Before first use on a
device each API is checked against the eager path (nvfp4.dequantize + expert_forward); any
mismatch or error disables it, so a kernel problem costs speed, never correctness. Tests run the
kernel under Triton's interpreter with fp32 dot operands (it has no bf16 arithmetic; every E2M1
value and bf16 activation is exact in both), see fp8_kernel.py. Production never uses the
interpreter. Blobs may come as float4_e2m1fn_x2 (the host format's tag dtype) or as uint8
views: the kernel reads their bytes.
Glossary: M tokens (<= 16 in decode), N output rows, K input width, H hidden, I expert width,
W blob bytes per row, G groups of 16 inputs per row, S cache slots, E the layer's experts,
n experts selected for the token(s), e one of them.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from engine.experts import nvfp4
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
from engine.experts.storage import to_device

log = logging.getLogger(__name__)

# Rows per program: H=4096 rows / 64 = 64 programs per expert (as fp8_kernel's BLOCK_N). Each
# step reads GROUPS groups, 4 KB of codes at 8 groups; tests shrink both for ragged row blocks
# and several steps on small shapes.
BLOCK_N = 64
MAX_GROUPS = 8
_checked: dict[tuple[torch.device, bool], bool] = {}

if TRITON_IMPORTED:  # decorating is cheap; tests also compile it for sm_90 without a GPU
    import triton
    import triton.language as tl

    @triton.jit
    def _e2m1(code):
        """E2M1 codes (0..15, any integer type) -> their values in fp32, built on the bits:
        magnitude index m = code & 7 is 0 -> 0, 1 -> 0.5, and from 2 on exponent m // 2 - 1
        with mantissa bit m & 1 (1, 1.5, 2, 3, 4, 6); bit 3 is the sign (-0.0 included)."""
        c = code.to(tl.uint32)
        m = c & 7
        bits = tl.where(m >= 2, (m << 22) + 0x3F000000, tl.where(m == 1, 0x3F000000, 0))
        return (bits.to(tl.uint32) | ((c & 8) << 28)).to(tl.float32, bitcast=True)

    @triton.jit
    def _e4m3(byte):
        """E4M3 bytes (uint8) -> their values in fp32, exactly as PyTorch converts them:
        normals by placing exponent and mantissa in fp32 bits, subnormals as mantissa x 2^-9,
        the sign by its bit (-0.0 included), S.1111.111 as NaN."""
        b = byte.to(tl.uint32)
        e = (b >> 3) & 15
        normal = (((e + 120) << 23) | ((b & 7) << 20)).to(tl.float32, bitcast=True)
        mag = tl.where(e == 0, (b & 7).to(tl.float32) * 0.001953125, normal)
        value = (mag.to(tl.uint32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)
        return tl.where((b & 0x7F) == 0x7F, float("nan"), value)

    @triton.jit
    def _nvfp4_matmul_kernel(x_ptr, w_ptr, d_ptr, y_ptr, ids_ptr, eids_ptr, M, N, K, stride_xe,
                             stride_xm, stride_ws, stride_wn, stride_de, stride_ye, stride_ym,
                             INDEXED: tl.constexpr, GATED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                             GROUPS: tl.constexpr):
        """y[e] = x[e] @ w[slot_e]^T for expert e = program_id(1), rows BLOCK_N * program_id(0)
        ..+ BLOCK_N. w is the slots as bytes; d the divisor table, row d_e. INDEXED: slot_e is
        ids[e] and d_e is eids[e] (the layer's table by expert id); else both are e. GATED:
        x[e] is [M, 2K] = [gate | up] and the input is bf16(bf16(silu(gate)) * up), rounded as
        the eager path rounds. K is a multiple of GROUP * GROUPS (the host picks GROUPS)."""
        HALF: tl.constexpr = GROUP // 2
        e = tl.program_id(1)
        slot = tl.load(ids_ptr + e).to(tl.int64) if INDEXED else e.to(tl.int64)
        d_row = tl.load(eids_ptr + e).to(tl.int64) if INDEXED else e.to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        m_mask = offs_m[:, None] < M
        # A group's 16 inputs are taken as its 8 even columns, then its 8 odd ones: the low
        # nibbles of its 8 code bytes, then the same bytes' high nibbles. So the weights are two
        # 8-byte runs a row (vector loads) and x is read in the matching order. Not tl.join +
        # tl.reshape of the nibbles into K's order: on the H200 (Triton 3.6) a dot fed by that
        # reshape computed garbage (rel. error 1.4), while the reshape alone, stored, was right.
        cols = tl.arange(0, GROUP)
        order = 2 * (cols % HALF) + cols // HALF  # input column of each dot position
        x_rows = x_ptr + e * stride_xe + offs_m[:, None] * stride_xm + order[None, :]
        rows = w_ptr + slot * stride_ws + offs_n * stride_wn  # [BN]: each row's first byte
        codes = rows[:, None] + (cols % HALF)[None, :]  # [BN, GROUP]: each code byte twice
        shifts = ((cols // HALF) * 4).to(tl.uint32)[None, :]  # low nibbles, then high
        scales = rows + K // 2  # [BN]: each row's first scale byte
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # builtins only, see GATED
        for g0 in range(0, K // GROUP, GROUPS):
            for i in tl.static_range(GROUPS):
                g = g0 + i
                x = tl.load(x_rows + g * GROUP, mask=m_mask, other=0.0)  # bf16
                if GATED:
                    gate = x.to(tl.float32)
                    up = tl.load(x_rows + K + g * GROUP, mask=m_mask, other=0.0).to(tl.float32)
                    # silu spelt out: tl.sigmoid (like tl.zeros) is itself @jit, which the tests'
                    # interpreter cannot call (Triton was imported before they switched it on).
                    x = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32) * up
                x = x.to(tl.bfloat16).to(DOT_DTYPE)
                byte = tl.load(codes + g * HALF, mask=n_mask[:, None], other=0)  # [BN, GROUP]
                w = _e2m1((byte.to(tl.uint32) >> shifts) & 15)
                step = _e4m3(tl.load(scales + g, mask=n_mask, other=0))  # [BN]
                acc += tl.dot(x, tl.trans(w.to(DOT_DTYPE))) * step[None, :]
        d = tl.load(d_ptr + d_row * stride_de + offs_n, mask=n_mask, other=1.0)
        y = tl.div_rn(acc, tl.broadcast_to(d[None, :], (BLOCK_M, BLOCK_N)))
        tl.store(y_ptr + e * stride_ye + offs_m[:, None] * stride_ym + offs_n[None, :],
                 y.to(tl.bfloat16), mask=m_mask & n_mask[None, :])

    # The interpreter's triton.jit returns its own kind of function: this module's kernels run
    # under it exactly when this flag is set (a test's private copy, never production).
    INTERPRETED = not isinstance(_nvfp4_matmul_kernel, triton.runtime.JITFunction)
else:  # pragma: no cover - depends on the torch build
    INTERPRETED = False
KERNEL_AVAILABLE = TRITON_IMPORTED and (torch.cuda.is_available() or INTERPRETED)


def groups_per_step(k: int, most: int = MAX_GROUPS) -> int:
    """The most groups, up to `most` (a power of two), that divides a row's G = K / 16: as a
    power of two, the count tl.arange takes."""
    groups = most
    while (k // nvfp4.GROUP) % groups:
        groups //= 2
    return groups


def _check_slots(slots: torch.Tensor) -> tuple[int, int]:
    """(N, K) of slots [S, N, W] (float4_e2m1fn_x2 or uint8), each slot's blob contiguous (the
    slot stride is free)."""
    if slots.dtype not in (nvfp4.BLOB_DTYPE, torch.uint8) or slots.dim() != 3:
        raise ValueError(f"NVFP4 kernel takes float4_e2m1fn_x2 (or uint8) blobs, got "
                         f"{tuple(slots.shape)} {slots.dtype}")
    n, k = nvfp4.matrix_shape(slots)  # refuses a width that is not an NVFP4 blob's
    if n == 0 or k == 0:
        raise ValueError(f"NVFP4 kernel needs a non-empty matrix, got {n}x{k}")
    if slots.stride(2) != 1 or slots.stride(1) != slots.shape[2]:
        raise ValueError("NVFP4 kernel needs each slot's blob contiguous")
    return n, k


def _check_divisors(divisors: torch.Tensor, rows: int, name: str, device: torch.device,
                    table: bool) -> torch.Tensor:
    """A divisor table [E, N] (table) or one expert's divisors [N] as the kernel reads them:
    fp32, contiguous, on the tokens' device, [E, N] or [1, N]."""
    shape = (divisors.shape[0] if divisors.dim() else 0, rows) if table else (rows,)
    if tuple(divisors.shape) != shape or not divisors.is_floating_point():
        raise ValueError(f"{name} divisors must be floating point {'[experts, ' if table else '['}"
                         f"{rows}], got {tuple(divisors.shape)} {divisors.dtype}")
    return divisors.to(device=device, dtype=torch.float32).reshape(-1, rows).contiguous()


def _check_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Both matrices' blobs valid and of one expert whose hidden size is x's."""
    (gu_n, gu_k), (dn_n, dn_k) = _check_slots(gate_up), _check_slots(down)
    if gu_k != x.shape[1] or dn_n != x.shape[1] or gu_n != 2 * dn_k:
        raise ValueError(f"NVFP4 expert of gate_up {gu_n}x{gu_k} and down {dn_n}x{dn_k} does "
                         f"not fit tokens of width {x.shape[1]}")
    if gate_up.shape[0] != down.shape[0]:
        raise ValueError(f"{gate_up.shape[0]} gate_up slots but {down.shape[0]} down slots")


def _launch(x: torch.Tensor, slots: torch.Tensor, divisors: torch.Tensor,
            slot_ids: torch.Tensor | None, expert_ids: torch.Tensor | None,
            gated: bool) -> torch.Tensor:
    """One launch for n experts -> [n, M, N] bf16.

    x [M, K] bf16 (shared by all experts) or [n, M, 2K] (gated: per expert), K-contiguous;
    slots [S, N, W] (checked by _check_slots); divisors fp32 [E, N] (checked by
    _check_divisors); slot_ids and expert_ids int32 [n], or both None (expert e is slot e and
    divisor row e, n = S).
    """
    rows, k = nvfp4.matrix_shape(slots)
    n = slots.shape[0] if slot_ids is None else slot_ids.shape[0]
    m = x.shape[-2]
    y = torch.empty((n, m, rows), dtype=torch.bfloat16, device=x.device)
    raw = slots.view(torch.uint8)  # Triton has no float4_e2m1fn_x2: the same bytes
    grid = (triton.cdiv(rows, BLOCK_N), n)
    # Triton launches on the current device's current stream, not on the tensors' device.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _nvfp4_matmul_kernel[grid](
            x, raw, divisors, y, raw if slot_ids is None else slot_ids,
            raw if expert_ids is None else expert_ids, m, rows, k,
            x.stride(0) if x.dim() == 3 else 0, x.stride(-2), raw.stride(0), raw.stride(1),
            divisors.stride(0), y.stride(0), y.stride(1), INDEXED=slot_ids is not None,
            GATED=gated, DOT_DTYPE=tl.float32 if INTERPRETED else tl.bfloat16, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, GROUP=nvfp4.GROUP, GROUPS=groups_per_step(k), num_warps=NUM_WARPS,
            num_stages=NUM_STAGES, enable_fp_fusion=ENABLE_FP_FUSION)
    return y


def nvfp4_expert_forward(x: torch.Tensor, gate_up_blob: torch.Tensor, gate_up_div: torch.Tensor,
                         down_blob: torch.Tensor, down_div: torch.Tensor) -> torch.Tensor:
    """One expert's SiLU-gated MLP straight from its NVFP4 blobs. x [t <= MAX_TOKENS, H] bf16;
    gate_up_blob [2I, W(H)] with divisors [2I], down_blob [H, W(I)] with divisors [H], blobs
    float4_e2m1fn_x2 (or uint8) on x's device -> [t, H] bf16."""
    x = check_tokens(x)
    gate_up, down = gate_up_blob[None], down_blob[None]
    _check_expert(x, gate_up, down)
    gu_d = _check_divisors(gate_up_div, gate_up.shape[1], "gate_up", x.device, table=False)
    dn_d = _check_divisors(down_div, down.shape[1], "down", x.device, table=False)
    gu = _launch(x, gate_up, gu_d, None, None, gated=False)
    return _launch(gu, down, dn_d, None, None, gated=True)[0]


def grouped_nvfp4_expert_forward(x: torch.Tensor, gate_up_slots: torch.Tensor,
                                 down_slots: torch.Tensor, slot_ids: torch.Tensor,
                                 gate_up_div: torch.Tensor, down_div: torch.Tensor,
                                 expert_ids: torch.Tensor) -> torch.Tensor:
    """Every selected expert's SiLU-gated MLP on the same tokens, in two launches.

    x [M <= MAX_TOKENS, H] bf16; gate_up_slots [S, 2I, W(H)] and down_slots [S, H, W(I)],
    float4_e2m1fn_x2 (or uint8), one blob per slot (the slot stride may exceed a blob);
    slot_ids int32 [n] naming the slots to use; gate_up_div [E, 2I] and down_div [E, H], the
    layer's divisor tables, read at rows expert_ids (int32 [n]) inside the kernel, as
    fp8_kernel reads its scale tables. Ids and tables should already be on x's device (else a
    copy per call; in range: never checked, it would cost a device sync). -> [n, M, H] bf16,
    unweighted: the caller applies the routing weights and sums in its fixed order.
    """
    x = check_tokens(x)
    _check_expert(x, gate_up_slots, down_slots)
    ids = slot_ids.to(device=x.device, dtype=torch.int32).contiguous()
    experts = expert_ids.to(device=x.device, dtype=torch.int32).contiguous()
    if experts.shape != ids.shape or ids.dim() != 1:
        raise ValueError(f"expert ids for {experts.shape[0]} experts, slot ids for {ids.shape[0]}")
    gu_d = _check_divisors(gate_up_div, gate_up_slots.shape[1], "gate_up", x.device, table=True)
    dn_d = _check_divisors(down_div, down_slots.shape[1], "down", x.device, table=True)
    gu = _launch(x, gate_up_slots, gu_d, ids, experts, gated=False)
    return _launch(gu, down_slots, dn_d, ids, experts, gated=True)


def kernel_usable(device: torch.device, hidden: int, width: int, fmt: str = "nvfp4",
                  grouped: bool = False) -> bool:
    """True once nvfp4_expert_forward (or, grouped, grouped_nvfp4_expert_forward) has matched
    the eager path on `device` (checked once). `fmt` must be "nvfp4" (the FP8 kernels'
    signature)."""
    if fmt != "nvfp4":
        raise ValueError(f"the NVFP4 kernel reads NVFP4 blobs, not {fmt}")
    return usable_once(_checked, device, grouped, INTERPRETED,
                       lambda: _self_test(device, hidden, width, grouped))


def grouped_kernel_usable(device: torch.device, hidden: int, width: int,
                          fmt: str = "nvfp4") -> bool:
    return kernel_usable(device, hidden, width, fmt, grouped=True)


def random_blob(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(blob [rows, W(cols)] float4_e2m1fn_x2, divisors fp32 [rows]) on the CPU, built as
    bytes: every code, finite positive E4M3 scales from 1/8 to 240 (exponent fields 4 to 14,
    every mantissa: no NaN byte), divisors that make the scaled values round, outputs of order 1
    for inputs of order 1."""
    codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.randint(4, 15, (rows, cols // nvfp4.GROUP), generator=gen) << 3) | \
        torch.randint(0, 8, (rows, cols // nvfp4.GROUP), generator=gen)
    # E2M1 values have an RMS of 2.9 and these scales one of 65: weights of RMS ~0.6 / sqrt(cols)
    divisors = (torch.rand(rows, generator=gen) + 0.5) * 330 * cols**0.5
    blob = torch.cat([codes, scales.to(torch.uint8)], dim=1)
    return blob.view(nvfp4.BLOB_DTYPE), divisors


def random_blobs(hidden: int, width: int, experts: int = 3, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2I, W(H)], gate_up_div [E, 2I], down [E, H, W(I)], down_div [E, H]):
    distinct random NVFP4 experts (random_blob), without quantising, which would cost seconds
    at a model's size. On the CPU, seeded."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = [random_blob(2 * width, hidden, gen) for _ in range(experts)]
    down = [random_blob(hidden, width, gen) for _ in range(experts)]
    return (torch.stack([b for b, _ in gate_up]), torch.stack([d for _, d in gate_up]),
            torch.stack([b for b, _ in down]), torch.stack([d for _, d in down]))


def eager(x: torch.Tensor, gate_up_blob: torch.Tensor, gate_up_div: torch.Tensor,
          down_blob: torch.Tensor, down_div: torch.Tensor) -> torch.Tensor:
    """The reference: dequantise to bf16, then the eager expert MLP."""
    return expert_forward(x, nvfp4.dequantize(gate_up_blob, gate_up_div, torch.bfloat16),
                          nvfp4.dequantize(down_blob, down_div, torch.bfloat16))


def _self_test(device: torch.device, hidden: int, width: int, grouped: bool) -> bool:
    try:
        x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
        x = x.to(device, torch.bfloat16)
        gu, gu_d, dn, dn_d = (to_device(t, device) for t in random_blobs(hidden, width))
        ids = [2, 0]  # out of order, slot 1 skipped
        if grouped:  # as the slots would call it: the layer's divisor tables by expert id
            t_ids = torch.tensor(ids, dtype=torch.int32, device=device)
            ours = grouped_nvfp4_expert_forward(x, gu, dn, t_ids, gu_d, dn_d, t_ids)
        else:
            ours = torch.stack([nvfp4_expert_forward(x, gu[i], gu_d[i], dn[i], dn_d[i])
                                for i in ids])
        return agrees_with_eager(ours, [eager(x, gu[i], gu_d[i], dn[i], dn_d[i]) for i in ids],
                                 f"{'grouped' if grouped else 'single'} NVFP4 expert kernel")
    except Exception as exc:  # a compiler or driver problem: fall back to the eager path
        log.warning("NVFP4 expert kernel unavailable on %s (%s): using the eager path", device,
                    exc)
        return False

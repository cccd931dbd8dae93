"""Triton kernels for decode-sized expert matmuls that read one-byte weights directly: FP8
E4M3 with a per-expert scale, or int8 with per-row scales (the int8 host format). Weights are
converted to bf16 in registers with fp32 accumulation and the scale applied once at the end,
so a cached expert costs one pass over its 25 MB instead of an eager dequantise + matmul.

One kernel serves both APIs: `fp8_expert_forward` (one expert) and `grouped_expert_forward`
(all of a token's experts). Each is two launches: gate_up, then down with SiLU(gate) * up fused
into the load of its input, where the eager path takes five kernels per expert. The grouped
form covers every selected expert with a 2-D grid (N blocks, experts), so a decode step costs
2 launches per layer instead of ~5 per expert (launch overhead rivals the weight reads at M=1).

Imports cleanly without Triton or CUDA (KERNEL_AVAILABLE is then False). Before first use on a
device each API is checked against the eager path; any mismatch or error disables it and the
eager path serves instead, so a kernel problem costs speed, never correctness.

Tests run the kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, read when
the kernels are decorated, i.e. at import). The interpreter has no bf16 arithmetic (it holds
bf16 as raw uint16 bits: a bf16 tl.dot multiplies bit patterns, int8 -> bf16 reinterprets bits),
so there the dot operands are fp32 instead. Every E4M3 and int8 value and every bf16 activation
is exact in both, and a product of two bf16 is exact in fp32, so the interpreted arithmetic is
the GPU's up to the fp32 accumulation order. Production never uses the interpreter.
Glossary: M tokens (<= 16 in decode), N output rows, K input width, H hidden, I expert width,
S cache slots, n experts selected for the token(s), e one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch

from engine.experts.compute import eager_dequantize, expert_forward

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU builds have none unless the test extra adds it.
    import triton
    import triton.language as tl

    _knobs = getattr(triton, "knobs", None)  # Triton >= 3.3; older ones read the variable directly
    INTERPRETED = bool(_knobs.runtime.interpret) if _knobs is not None else \
        os.environ.get("TRITON_INTERPRET") == "1"
    TRITON_IMPORTED = True
except ImportError:  # pragma: no cover - depends on the torch build
    TRITON_IMPORTED = INTERPRETED = False
KERNEL_AVAILABLE = TRITON_IMPORTED and (torch.cuda.is_available() or INTERPRETED)

MAX_TOKENS = 16  # beyond this (prefill), dequantise once and use cuBLAS
# Weights are the traffic (decode is memory bound): each program streams a [BLOCK_N, BLOCK_K]
# tile whose rows are BLOCK_K contiguous bytes, and H=4096 rows / 64 = 64 programs per expert
# keep an H100/H200's 132 SMs busy once 4 experts share a launch. Tests shrink these to cover
# several K steps and ragged edges on small shapes.
BLOCK_N = 64
BLOCK_K = 128
BLOCK_M = 16  # tokens padded to the smallest tl.dot tile
NUM_WARPS, NUM_STAGES = 4, 3
# Explicit, so Triton 3.9 does not warn about its changing default; unfused like the interpreter.
ENABLE_FP_FUSION = False
SELF_TEST_ATOL = 0.05
_checked: dict[tuple[torch.device, tuple[bool, str]], bool] = {}

if TRITON_IMPORTED:  # decorating is cheap; tests also compile it for sm_90 without a GPU

    @triton.jit
    def _expert_matmul_kernel(x_ptr, w_ptr, y_ptr, s_ptr, ids_ptr, sids_ptr, M, N, K, stride_xe,
                              stride_xm, stride_ws, stride_wn, stride_ye, stride_ym, stride_se,
                              INDEXED: tl.constexpr, SCALE_INDEXED: tl.constexpr,
                              GATED: tl.constexpr, ROW_SCALES: tl.constexpr,
                              DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[e] = x[e] @ (w[slot_e] x s[scale_e])^T for expert e = program_id(1); program_id(0)
        picks BLOCK_N output rows. scale_e is sids[e] (SCALE_INDEXED: s is every expert's
        table, indexed by expert id) or e. GATED: x[e] is [M, 2K] = [gate | up] and the input
        is bf16(bf16(silu(gate)) * up), rounded as the eager path rounds."""
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        if INDEXED:
            slot = tl.load(ids_ptr + e).to(tl.int64)  # int64: S x 2I x H overflows int32
        else:
            slot = e.to(tl.int64)
        w_base = w_ptr + slot * stride_ws
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # builtins only, see GATED
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x_ptrs = x_ptr + e * stride_xe + offs_m[:, None] * stride_xm + offs_k[None, :]
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)  # bf16
            if GATED:
                gate = x.to(tl.float32)
                up = tl.load(x_ptrs + K, mask=x_mask, other=0.0).to(tl.float32)
                # silu spelt out: tl.sigmoid (like tl.zeros) is itself @jit, which the tests'
                # interpreter cannot call (Triton was imported before they switched it on).
                x = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32) * up
            w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(x.to(tl.bfloat16).to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)))  # [BM, BN]
        if SCALE_INDEXED:
            s_row = tl.load(sids_ptr + e).to(tl.int64)
        else:
            s_row = e.to(tl.int64)
        if ROW_SCALES:
            scale = tl.load(s_ptr + s_row * stride_se + offs_n, mask=offs_n < N, other=0.0)[None, :]
        else:
            scale = tl.load(s_ptr + s_row * stride_se)
        y = (acc * scale).to(tl.bfloat16)
        tl.store(y_ptr + e * stride_ye + offs_m[:, None] * stride_ym + offs_n[None, :], y,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _launch(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor,
            slot_ids: torch.Tensor | None, out_rows: int, gated: bool,
            scale_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One launch for n experts -> [n, M, out_rows] bf16.

    x [M, K] (shared by all experts) or [n, M, 2K] (gated: per expert); weights [S, N, K] with
    rows K-contiguous; slot_ids int32 [n] or None (expert e is slot e); scales fp32 on x's
    device, [n] (FP8) or [n, N] (int8) in the experts' order, or with scale_ids (int32 [n])
    every expert's table [E] / [E, N], row scale_ids[e] for expert e.
    """
    n = scales.shape[0] if scale_ids is None else scale_ids.shape[0]
    m, k = x.shape[-2], weights.shape[2]
    if weights.stride(2) != 1 or x.stride(-1) != 1:
        raise ValueError("expert kernel needs K-contiguous weights and inputs")
    y = torch.empty((n, m, out_rows), dtype=torch.bfloat16, device=x.device)
    grid = (triton.cdiv(out_rows, BLOCK_N), n)
    # Triton launches on the current device's current stream, not on the tensors' device:
    # layers on a second GPU would otherwise launch on cuda:0 (or fail its pointer check).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch_kernel(grid, x, weights, y, scales, slot_ids, scale_ids, m, out_rows, k, gated)
    return y


def _launch_kernel(grid, x, weights, y, scales, slot_ids, scale_ids, m, out_rows, k, gated) -> None:
    _expert_matmul_kernel[grid](
        x, weights, y, scales, scales if slot_ids is None else slot_ids,
        scales if scale_ids is None else scale_ids, m, out_rows, k,
        x.stride(0) if x.dim() == 3 else 0, x.stride(-2), weights.stride(0), weights.stride(1),
        y.stride(0), y.stride(1), scales.stride(0), INDEXED=slot_ids is not None,
        SCALE_INDEXED=scale_ids is not None, GATED=gated, ROW_SCALES=scales.dim() == 2, DOT_DTYPE=tl.float32 if INTERPRETED else tl.bfloat16,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES, enable_fp_fusion=ENABLE_FP_FUSION)


def _scales(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    return scale.to(device=device, dtype=torch.float32).contiguous()


def _one_expert_scales(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One expert's scale (0-d, or [N] per row) as a batch of one: [1] or [1, N]."""
    scale = _scales(scale, device)
    return scale.reshape(1, -1) if scale.dim() == 1 else scale.reshape(1)


def _check_tokens(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] > MAX_TOKENS or x.dtype != torch.bfloat16:
        raise ValueError(f"expert kernel takes [<= {MAX_TOKENS}, H] bf16 tokens, got "
                         f"{tuple(x.shape)} {x.dtype}")
    return x.contiguous()


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (weight [N, K] x scale)^T -> [M, N] bf16, M <= MAX_TOKENS.

    weight FP8 with a 0-d scale, or int8 with a [N] per-row scale.
    """
    scales = _one_expert_scales(scale, x.device)
    return _launch(_check_tokens(x), weight[None], scales, None, weight.shape[0], gated=False)[0]


def fp8_expert_forward(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                       down: torch.Tensor, down_scale: torch.Tensor) -> torch.Tensor:
    """One expert's SiLU-gated MLP straight from FP8 or int8 weights. x [t, H] bf16 -> [t, H]
    bf16; scales as for fp8_matmul (0-d, or per row [2I] and [H])."""
    gu_s, dn_s = (_one_expert_scales(s, x.device) for s in (gate_up_scale, down_scale))
    gu = _launch(_check_tokens(x), gate_up[None], gu_s, None, gate_up.shape[0], gated=False)
    return _launch(gu, down[None], dn_s, None, down.shape[0], gated=True)[0]


def grouped_expert_forward(x: torch.Tensor, gate_up_slots: torch.Tensor, down_slots: torch.Tensor,
                           slot_ids: torch.Tensor, gate_up_scales: torch.Tensor,
                           down_scales: torch.Tensor, expert_ids: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Every selected expert's SiLU-gated MLP on the same tokens, in two launches.

    x [M, H] bf16 (M <= MAX_TOKENS); gate_up_slots [S, 2I, H] and down_slots [S, H, I], FP8 or
    int8, K-contiguous; slot_ids int32 [n] naming the slots to use (in range: never checked, it
    would cost a device sync). Scales per expert (FP8) or per row (int8): without expert_ids,
    indexed like slot_ids ([n] or [n, 2I] / [n, H]); with expert_ids (int32 [n]), the whole
    layer's tables ([E] or [E, 2I] / [E, H]), read at those rows inside the kernel (no gather
    launches). Ids and scales should already be on x's device (anything else is a copy per
    call); fp32 contiguous scales are used as they are. -> [n, M, H] bf16, unweighted: the
    caller applies the routing weights and sums in its fixed order.
    """
    x = _check_tokens(x)
    n = slot_ids.shape[0]
    ids = slot_ids.to(device=x.device, dtype=torch.int32).contiguous()
    gu_s, dn_s = _scales(gate_up_scales, x.device), _scales(down_scales, x.device)
    rows = None if expert_ids is None else expert_ids.to(device=x.device, dtype=torch.int32).contiguous()
    if rows is None and (gu_s.shape[0] != n or dn_s.shape[0] != n):
        raise ValueError(f"scales for {gu_s.shape[0]} / {dn_s.shape[0]} experts, ids for {n}")
    if rows is not None and rows.shape[0] != n:
        raise ValueError(f"expert ids for {rows.shape[0]} experts, slot ids for {n}")
    gu = _launch(x, gate_up_slots, gu_s, ids, gate_up_slots.shape[1], gated=False, scale_ids=rows)
    return _launch(gu, down_slots, dn_s, ids, down_slots.shape[1], gated=True, scale_ids=rows)


def usable_once(checked: dict, device: torch.device, key, interpreted: bool,
                self_test: Callable[[], bool]) -> bool:
    """A kernel's verdict on `device`: self_test() the first time (per device and key), then
    remembered. Never under the interpreter outside tests (it is numpy, thousands of times
    slower; `interpreted` is the calling module's own flag) and never off CUDA."""
    verdict = checked.get((device, key))  # the hot path: one lookup once checked
    if verdict is not None:
        return verdict
    if not TRITON_IMPORTED or interpreted or device.type != "cuda" or not torch.cuda.is_available():
        return False
    checked[device, key] = self_test()
    return checked[device, key]


def kernel_usable(device: torch.device, hidden: int, width: int, fmt: str = "fp8",
                  grouped: bool = False) -> bool:
    """True once fp8_expert_forward (grouped: grouped_expert_forward) has matched the eager path
    on `device` for weights in `fmt` ("fp8" or "int8"), checked once. Per format: a GPU whose
    Triton has no E4M3 (before sm_89, e.g. an RTX 3090) still runs the int8 kernel."""
    return usable_once(_checked, device, (grouped, fmt), INTERPRETED,
                       lambda: _self_test(device, hidden, width, grouped, fmt))


def grouped_kernel_usable(device: torch.device, hidden: int, width: int, fmt: str = "fp8") -> bool:
    return kernel_usable(device, hidden, width, fmt, grouped=True)


def _self_test_experts(hidden: int, width: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Three experts per format with distinct scales, so a wrong slot or scale shows."""
    from engine.experts.store import requantize_int8

    gen = torch.Generator(device="cpu").manual_seed(0)
    gate_up = (torch.randn(3, 2 * width, hidden, generator=gen) * 30).to(torch.float8_e4m3fn)
    down = (torch.randn(3, hidden, width, generator=gen) * 30).to(torch.float8_e4m3fn)
    scales = torch.tensor([1.0, 1.5, 0.7]) * hidden**-0.5 / 30
    gu_q, gu_rows = requantize_int8(gate_up, scales)
    dn_q, dn_rows = requantize_int8(down, scales)
    return {"fp8": (gate_up, scales, down, scales), "int8": (gu_q, gu_rows, dn_q, dn_rows)}


def agrees_with_eager(ours: torch.Tensor, refs: list[torch.Tensor], what: str) -> bool:
    """Whether each expert's kernel output (ours [n, M, H]) is within SELF_TEST_ATOL of its eager
    reference, relative to the reference's largest value (NaN fails); a disagreement is logged.
    The verdict every expert kernel's self-test gives."""
    for ours_e, ref in zip(ours.float(), refs, strict=True):
        ref = ref.float()
        error = float((ours_e - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
        if not error <= SELF_TEST_ATOL:
            log.warning("%s disagrees with the eager path (rel. error %.3g): disabled", what, error)
            return False
    return True


def _self_test(device: torch.device, hidden: int, width: int, grouped: bool, fmt: str) -> bool:
    try:
        x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
        x = x.to(device, torch.bfloat16)
        ids = torch.tensor([2, 0], dtype=torch.int32)  # out of order, slot 1 skipped
        for name, weights in _self_test_experts(hidden, width).items():
            if name != fmt:
                continue
            gu, gu_s, dn, dn_s = (t.to(device) for t in weights)
            if grouped:  # as LayerSlots calls it: slots and the layer's scale tables by expert id
                ours = grouped_expert_forward(x, gu, dn, ids.to(device), gu_s, dn_s, ids.to(device))
            else:
                ours = torch.stack([fp8_expert_forward(x, gu[i], gu_s[i], dn[i], dn_s[i])
                                    for i in ids.tolist()])
            # The eager reference, not dequant_expert: on a GPU that may be a kernel itself.
            refs = [expert_forward(x, eager_dequantize(gu[i], gu_s[i]), eager_dequantize(dn[i], dn_s[i]))
                    for i in ids.tolist()]
            if not agrees_with_eager(ours, refs, f"{'grouped' if grouped else 'single'} {name} expert kernel"):
                return False
        return True
    except Exception as exc:  # a compiler or driver problem: fall back to the eager path
        log.warning("FP8 kernel unavailable on %s (%s): using the eager path", device, exc)
        return False

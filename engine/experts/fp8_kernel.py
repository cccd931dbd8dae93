"""A Triton kernel for decode-sized expert matmuls that reads one-byte weights directly: FP8
E4M3 with a per-expert scale, or int8 with per-row scales (the int8 host format). Weights are
converted to bf16 in registers with fp32 accumulation and the scale applied once at the end,
so a cached expert costs one pass over its 25 MB instead of an eager dequantise + matmul.

Imports cleanly without Triton or CUDA (KERNEL_AVAILABLE is then False). Before first use on a
device the kernel is checked against the eager path; any mismatch or error disables it and
the eager path serves instead, so a kernel problem costs speed, never correctness.
Glossary: M tokens (<= 16 in decode), N output rows, K input width.
"""

from __future__ import annotations

import logging

import torch

from engine.experts.compute import dequant_expert, expert_forward

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton
    import triton.language as tl

    KERNEL_AVAILABLE = torch.cuda.is_available()
except ImportError:  # pragma: no cover - depends on the torch build
    KERNEL_AVAILABLE = False

MAX_TOKENS = 16  # beyond this (prefill), dequantise once and use cuBLAS
SELF_TEST_ATOL = 0.05
_checked: dict[torch.device, bool] = {}

if KERNEL_AVAILABLE:

    @triton.jit
    def _fp8_matmul_kernel(x_ptr, w_ptr, y_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                           ROW_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))  # [BM, BN]
        if ROW_SCALES:
            scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        else:
            scale = tl.load(s_ptr)
        y = (acc * scale).to(tl.bfloat16)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y,
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (weight [N, K] x scale)^T -> [M, N] bf16, M <= MAX_TOKENS.

    weight FP8 with a 0-d scale, or int8 with a [N] per-row scale.
    """
    m, k = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    block_n, block_k = 64, 128
    grid = (triton.cdiv(n, block_n),)
    _fp8_matmul_kernel[grid](x, weight, y, scale, m, n, k, x.stride(0), weight.stride(0),
                             y.stride(0), ROW_SCALES=scale.dim() == 1, BLOCK_M=16,
                             BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def fp8_expert_forward(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                       down: torch.Tensor, down_scale: torch.Tensor) -> torch.Tensor:
    """One expert's SiLU-gated MLP straight from FP8 weights. x [t, H] bf16 -> [t, H] bf16."""
    gate, up = fp8_matmul(x, gate_up, gate_up_scale).chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    return fp8_matmul(hidden, down, down_scale)


def kernel_usable(device: torch.device, hidden: int, width: int) -> bool:
    """True once the kernel has matched the eager path on `device` (checked once per device)."""
    if not KERNEL_AVAILABLE or device.type != "cuda":
        return False
    if device not in _checked:
        _checked[device] = _self_test(device, hidden, width)
    return _checked[device]


def _self_test(device: torch.device, hidden: int, width: int) -> bool:
    from engine.experts.store import requantize_int8

    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        gate_up = (torch.randn(1, 2 * width, hidden, generator=gen) * 30).to(torch.float8_e4m3fn)
        down = (torch.randn(1, hidden, width, generator=gen) * 30).to(torch.float8_e4m3fn)
        scales = torch.tensor([hidden**-0.5 / 30])
        gu_q, gu_rows = requantize_int8(gate_up, scales)
        dn_q, dn_rows = requantize_int8(down, scales)
        x = torch.randn(3, hidden, generator=gen).to(device, torch.bfloat16)
        for weights in ((gate_up[0], scales[0], down[0], scales[0]),
                        (gu_q[0], gu_rows[0], dn_q[0], dn_rows[0])):
            gu, gu_s, dn, dn_s = (t.to(device) for t in weights)
            ours = fp8_expert_forward(x, gu, gu_s, dn, dn_s).float()
            ref = expert_forward(x, *dequant_expert(gu, gu_s, dn, dn_s, torch.bfloat16)).float()
            error = float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
            if error > SELF_TEST_ATOL:
                log.warning("expert kernel disagrees with the eager path (%s, rel. error %.3g): "
                            "disabled", gu.dtype, error)
                return False
        return True
    except Exception as exc:  # a compiler or driver problem: fall back to the eager path
        log.warning("FP8 kernel unavailable on %s (%s): using the eager path", device, exc)
        return False

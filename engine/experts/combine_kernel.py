"""One Triton launch that finishes a decode step's MoE on the GPU: the routed experts' outputs
weighted and summed in expert id order, plus the shared expert, plus the residual.

    h_next = h + (sum over e in id order of y_e * w_e + shared)

The eager path spends ~12 small kernels on this per layer (a multiply and an add per expert,
the zero-filled accumulator, two residual adds), each a launch the host pays before the next
layer's graph can start. The kernel rounds to bf16 exactly where the eager path does (each
product, each partial sum, the shared sum, the residual), so the two agree bit for bit; a
check against the eager path before first use on a device disables it on any difference.

Interpreter notes as in engine.experts.fp8_kernel: arithmetic is fp32 with explicit bf16
rounding, which the interpreter performs correctly. Glossary: n experts of the step, K experts
per token, H hidden.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from engine.experts.fp8_kernel import INTERPRETED, TRITON_IMPORTED, usable_once

log = logging.getLogger(__name__)
BLOCK = 1024  # H=4096: 4 programs, each streaming its columns of the n outputs once
_checked: dict[tuple[torch.device, None], bool] = {}

if TRITON_IMPORTED:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_bf16(x):
        """fp32 -> the nearest bf16 (ties to even), kept in fp32. Spelt out on the bits: the
        interpreter truncates in .to(tl.bfloat16), and this way both round alike."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN stays NaN: the GPU's canonical one (0x7FFFFFFF) would round into -0.0.
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _combine_kernel(ys_ptr, w_ptr, order_ptr, shared_ptr, h_ptr, out_ptr, n, H, stride_y,
                        BLOCK: tl.constexpr):
        """out = h + (sum_i bf16(ys[i] * w[order[i]]) + shared), rounded like the eager path."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        acc = tl.full((BLOCK,), 0.0, tl.float32)
        for i in range(n):
            w = tl.load(w_ptr + tl.load(order_ptr + i)).to(tl.float32)
            y = tl.load(ys_ptr + i * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
            acc = _round_bf16(acc + _round_bf16(y * w))
        shared = tl.load(shared_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Already a bf16 value, so the store's conversion is exact (truncating or not).
        out = _round_bf16(h + _round_bf16(acc + shared))
        tl.store(out_ptr + offs, out.to(tl.bfloat16), mask=mask)


def combine(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, shared: torch.Tensor,
            h: torch.Tensor) -> torch.Tensor:
    """ys [n, 1, H] bf16 expert outputs in expert id order; weights [1, K] bf16 routing weights
    in the router's order; order int32 [n]: for each output, its column in weights; shared and
    h [1, H] bf16 -> h + (routed + shared) [1, H] bf16. All on one device (ids never checked
    against K: that would cost a sync)."""
    if ys.dtype != torch.bfloat16 or ys.dim() != 3 or ys.shape[1] != 1:
        raise ValueError(f"combine takes [n, 1, H] bf16 outputs, got {tuple(ys.shape)} {ys.dtype}")
    hidden = ys.shape[2]
    ys = ys.contiguous()
    out = torch.empty((1, hidden), dtype=torch.bfloat16, device=ys.device)
    with torch.cuda.device(ys.device) if ys.is_cuda else contextlib.nullcontext():
        _combine_kernel[(triton.cdiv(hidden, BLOCK),)](
            ys, weights.contiguous(), order, shared.contiguous(), h.contiguous(), out,
            ys.shape[0], hidden, ys.stride(0), BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def eager_combine(ys: torch.Tensor, weights: torch.Tensor, order: list[int], shared: torch.Tensor,
                  h: torch.Tensor) -> torch.Tensor:
    """What `combine` computes, as engine.model.moe.run_experts and the decoder do it."""
    routed = torch.zeros_like(h)
    for i, k in enumerate(order):
        routed += ys[i] * weights[0:1, k : k + 1]
    return h + (routed + shared)


def combine_usable(device: torch.device) -> bool:
    """True once `combine` has matched the eager path bit for bit on `device` (checked once)."""
    return usable_once(_checked, device, None, INTERPRETED, lambda: _self_test(device))


def _self_test(device: torch.device) -> bool:
    try:
        gen = torch.Generator().manual_seed(2)
        ys = torch.randn(4, 1, 300, generator=gen).to(device, torch.bfloat16)
        weights = torch.rand(1, 4, generator=gen).to(device, torch.bfloat16)
        shared, h = (torch.randn(1, 300, generator=gen).to(device, torch.bfloat16) for _ in "ab")
        order = [2, 0, 3, 1]
        ours = combine(ys, weights, torch.tensor(order, dtype=torch.int32, device=device), shared, h)
        if torch.equal(ours, eager_combine(ys, weights, order, shared, h)):
            return True
        log.warning("decode combine kernel differs from the eager path on %s: disabled", device)
    except Exception as exc:  # a compiler or driver problem: fall back to the eager path
        log.warning("decode combine kernel unavailable on %s (%s): using the eager path", device, exc)
    return False

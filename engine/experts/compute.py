"""Expert compute: one routed expert's SiLU-gated MLP from its host format (FP8 as shipped,
bf16, or the requantised int8 / int4 formats).

The eager path dequantises in fp32 and rounds once to the compute dtype, exactly as the
reference recipe, so offloaded and resident experts give identical results.
Glossary: t tokens for this expert, H hidden, I expert width.
"""

from __future__ import annotations

import torch

from engine.experts import fp8_cpu, int4, nvfp4, nvfp4_cpu
from engine.model.moe import expert_mlp
from engine.quant import FP8_DTYPE

# uint8: int4 blobs; float4_e2m1fn_x2: NVFP4 blobs (engine.experts.nvfp4)
QUANTISED = {FP8_DTYPE: "fp8", torch.int8: "int8", torch.uint8: "int4", nvfp4.BLOB_DTYPE: "nvfp4"}


def eager_dequantize(weight: torch.Tensor, scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One matrix in `dtype`, formed in fp32 and rounded once: the reference recipe, and what the
    fused kernel (engine.experts.dequant_kernel) must equal bit for bit in bf16."""
    if weight.dtype == torch.uint8:  # int4 blob: its scales are inside
        return int4.dequantize(weight, dtype)
    if weight.dtype == nvfp4.BLOB_DTYPE:  # NVFP4 blob: the row scales are its global divisors
        kernel = nvfp4_cpu.kernel() if weight.device.type == "cpu" else None
        if kernel is not None:  # the same bits, tens of times faster
            return kernel.dequantize(weight, scale, dtype)
        return nvfp4.dequantize(weight, scale, dtype)
    if weight.dtype not in QUANTISED:
        return weight.to(dtype)
    if weight.dtype == FP8_DTYPE and weight.device.type == "cpu" and weight.dim() == 2 \
            and weight.stride(1) == 1 and scale.numel() == 1 and fp8_cpu.available():
        return fp8_cpu.kernel().dequantize(weight, scale, dtype)  # the same bits, ~10x faster
    s = scale.to(device=weight.device, dtype=torch.float32)
    if weight.dtype == torch.int8:  # per-row scales [R]
        return (weight.to(torch.float32) * s[:, None]).to(dtype)
    return (weight.to(torch.float32) * s).to(dtype)


def dequant_expert(gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
                   down_scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) in `dtype` on the weights' device; in bf16 on a GPU, by
    one fused launch each (engine.experts.dequant_kernel, bit for bit the same) where it passed
    its self-test."""
    def deq(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if dtype == torch.bfloat16 and w.is_cuda and w.dtype in QUANTISED and w.is_contiguous():
            # Imported here: dequant_kernel imports the kernels that import this module.
            from engine.experts import dequant_kernel

            if dequant_kernel.kernel_usable(w.device, QUANTISED[w.dtype]):
                try:
                    return dequant_kernel.dequantize_bf16(w, s)
                except ValueError:  # a layout it does not take (e.g. unaligned): eager serves
                    pass
                except Exception as exc:  # noqa: BLE001 - e.g. a compile failure at a new shape
                    dequant_kernel.disable(w.device, QUANTISED[w.dtype], exc)
        return eager_dequantize(w, s, dtype)

    return deq(gate_up, gate_up_scale), deq(down, down_scale)


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [t, H] -> [t, H]."""
    return expert_mlp(x.to(gate_up.dtype), gate_up, down)


def cpu_expert_forward(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scale: torch.Tensor,
                       down: torch.Tensor, down_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert on the CPU straight from the host format (no dequantised copy): int8 and int4
    through PyTorch's weight-only kernels, FP8 and NVFP4 through Quire's own C kernels
    (engine.experts.fp8_cpu, nvfp4_cpu) for a few tokens; otherwise (many tokens, or no C
    compiler) by dequantisation, then PyTorch's matmul. x [t, H] -> [t, H]."""
    matmul = _cpu_matmul(gate_up.dtype, x.shape[0], dtype)
    if matmul is None:
        return expert_forward(x, *dequant_expert(gate_up, gate_up_scale, down, down_scale, dtype))
    gate, up = matmul(x.to(dtype), gate_up, gate_up_scale).chunk(2, dim=-1)  # [t, I] each
    h = torch.nn.functional.silu(gate) * up
    return matmul(h.contiguous(), down, down_scale)


def cpu_kernel_for(host_format: str):
    """Quire's C kernel for a host format's CPU experts (built and self-tested on the first
    call), or None: the format has PyTorch's own (int8, int4), or the kernel could not be built."""
    module = {"fp8": fp8_cpu, "nvfp4": nvfp4_cpu}.get(host_format)
    return module.kernel() if module is not None else None


def _cpu_matmul(weight_dtype: torch.dtype, num_tokens: int, dtype: torch.dtype):
    """matmul(x, weight, scale) -> x @ w^T in `dtype` straight from the format, or None."""
    if weight_dtype == torch.int8:
        return lambda xs, w, s: torch.ops.aten._weight_int8pack_mm(xs, w, s.to(dtype))
    if weight_dtype == torch.uint8:
        return lambda xs, w, s: int4.cpu_matmul(xs, w)
    for fmt, module in ((FP8_DTYPE, fp8_cpu), (nvfp4.BLOB_DTYPE, nvfp4_cpu)):
        if weight_dtype == fmt and num_tokens <= module.MAX_MATMUL_TOKENS and module.available():
            return lambda xs, w, s, module=module: module.kernel().matmul(xs, w, s).to(dtype)
    return None

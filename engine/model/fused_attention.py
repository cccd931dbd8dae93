"""Attention over key blocks through PyTorch's fused kernels, merged by log-sum-exp.

Long prefill re-expands the latent cache one key block at a time (engine.model.attention).
Merging blocks exactly needs each block's per-row log-sum-exp, which the public
scaled_dot_product_attention does not return; the fused kernels behind it do:
`_scaled_dot_product_flash_attention` (FlashAttention-2: bf16/fp16, equal head sizes) or
`_scaled_dot_product_efficient_attention` (any head sizes, fp32 too) on CUDA, and
`_scaled_dot_product_flash_attention_for_cpu` on the CPU. Where a kernel needs equal head sizes
the narrower ones are zero-padded (MLA: values 128 -> 192), which changes no score and no output
column. With them a block costs one kernel and no [t, k] scores in memory, against eight passes
over materialised fp32 scores.

These are private operators: before first use on a device and dtype the path is checked
against plain softmax attention, and any error or mismatch disables it (the materialised
key-block path then serves), so a change in PyTorch costs speed, never correctness.
Glossary: N heads, t queries, k keys, E query/key width, W value width.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENABLED = True  # tests switch it off to exercise the materialised path
# CUDA kernels in order of preference; the first to pass the self-test serves. Flash is usually
# the faster even with the values padded (unmeasured here): `python -m engine.bench
# --attention-kernel` pins one, to compare.
CUDA_KERNELS: tuple[str, ...] = ("flash", "efficient")
_checked: dict[tuple[str, torch.dtype], str | None] = {}  # the kernel that passed, or None
SELF_TEST_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.05, torch.float16: 0.02}


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                    scale: float, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """query [N, t, E], key [N, k, E], value [N, k, W] -> (out [N, t, W], lse [N, t] fp32).

    causal: query i sees keys 0..i, on a square diagonal block only (FlashAttention aligns a
    causal mask bottom-right, the memory-efficient kernel top-left: they agree when square).
    kernel: "flash" | "efficient" | "cpu"; default the one that passed for this device and dtype.
    """
    num_queries, width = query.shape[1], value.shape[-1]
    if causal and key.shape[1] != num_queries:
        raise ValueError(f"a causal block must be square, got {num_queries} queries, {key.shape[1]} keys")
    kernel = kernel or _checked.get((str(query.device), query.dtype)) or _default_kernel(query.device)
    if kernel == "efficient":
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            query[None], key[None], value[None], None, True, 0.0, causal, scale=scale)
        return out[0], lse[0, :, :num_queries].float()  # lse rows are padded to a tile
    padded = -(-max(query.shape[-1], width) // 8) * 8  # equal widths, a multiple of 8
    query, key, value = (t if t.shape[-1] == padded else F.pad(t, (0, padded - t.shape[-1]))
                         for t in (query, key, value))
    if kernel == "flash":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            query[None], key[None], value[None], 0.0, causal, False, scale=scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[None], key[None], value[None], 0.0, causal, scale=scale)
    return out[0, ..., :width], lse[0].float()


def _default_kernel(device: torch.device) -> str:
    return "efficient" if device.type == "cuda" else "cpu"


class LseMerge:
    """Outputs of key blocks merged into exact softmax attention over all their keys."""

    def __init__(self) -> None:
        self.acc: torch.Tensor | None = None  # [N, t, W] fp32
        self.lse: torch.Tensor | None = None  # [N, t] fp32

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.acc is None or self.lse is None:
            self.acc, self.lse = out.float(), lse
            return
        total = torch.logaddexp(self.lse, lse)
        self.acc = self.acc * (self.lse - total).exp()[..., None] + out.float() * (lse - total).exp()[..., None]
        self.lse = total

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        assert self.acc is not None
        return self.acc.to(dtype)


def _kernels(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    kernels = CUDA_KERNELS if device.type == "cuda" else ("cpu",)
    # FlashAttention takes half precision only
    return tuple(k for k in kernels if k != "flash") if dtype == torch.float32 else kernels


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """True once a fused kernel has matched plain attention on this device and dtype."""
    if not ENABLED:
        return False
    key = (str(device), dtype)
    if key not in _checked:
        _checked[key] = next((k for k in _kernels(device, dtype) if _self_test(device, dtype, k)), None)
    return _checked[key] is not None


def disable(device: torch.device, dtype: torch.dtype, reason: Exception) -> None:
    """The kernel in use failed on a real call: the next one that passes its self-test serves,
    else the materialised path, from now on."""
    key = (str(device), dtype)
    failed = _checked.get(key)
    later = _kernels(device, dtype)
    later = later[later.index(failed) + 1:] if failed in later else ()
    _checked[key] = next((k for k in later if _self_test(device, dtype, k)), None)
    log.warning("fused block attention (%s) failed on %s %s (%s): %s", failed, device, dtype,
                reason, f"using {_checked[key]}" if _checked[key] else "disabled")


# The self-test's shape: MLA's widths (query/key 192, values 128, so values are padded), and
# enough queries and keys for several kernel tiles.
_TEST_HEADS, _TEST_QUERIES, _TEST_KEYS, _TEST_QK, _TEST_V = 2, 130, 400, 192, 128


def _self_test(device: torch.device, dtype: torch.dtype, kernel: str) -> bool:
    """Two past blocks and a causal diagonal block, with unequal widths, against softmax."""
    try:
        gen = torch.Generator().manual_seed(0)
        n, t, s = _TEST_HEADS, _TEST_QUERIES, _TEST_KEYS
        query, key = torch.randn(n, t, _TEST_QK, generator=gen), torch.randn(n, s, _TEST_QK, generator=gen)
        value = torch.randn(n, s, _TEST_V, generator=gen)
        query, key, value = (x.to(device, dtype) for x in (query, key, value))
        scale = _TEST_QK**-0.5
        merge = LseMerge()
        past = s - t
        for lo, hi, causal in ((0, past // 2, False), (past // 2, past, False), (past, s, True)):
            merge.add(*block_attention(query, key[:, lo:hi], value[:, lo:hi], causal, scale, kernel))
        mask = torch.arange(s, device=device)[None, :] <= torch.arange(t, device=device)[:, None] + past
        ref = F.scaled_dot_product_attention(query.float(), key.float(), value.float(),
                                             attn_mask=mask, scale=scale)
        error = float((merge.result(torch.float32) - ref).abs().max())
        if error > SELF_TEST_TOLERANCE.get(dtype, 0.05):
            log.warning("fused block attention (%s) disagrees on %s %s (max error %.3g): not used",
                        kernel, device, dtype, error)
            return False
        return True
    except Exception as exc:  # a private operator changed or is missing: use the slower path
        log.warning("fused block attention (%s) unavailable on %s %s (%s)", kernel, device, dtype, exc)
        return False

"""Key-blocked attention: exact against the unblocked form, bounded in memory, and still at
parity with the transformers oracle when the key blocks are forced tiny.

Tolerances (random inputs, outputs of magnitude ~3.5, key blocks of 7): fp32 blocked vs unblocked
to 1e-5 absolute (measured max 2.6e-6, i.e. 8e-7 relative: only the summation order differs).
bf16 to 0.05 absolute (3 bf16 ulps at 2-4), mean 4e-3 (measured max 0.023, mean 1.9e-3): the
blocked form rounds probabilities to bf16 before the value matmul, as the reference's eager
attention does, where CPU SDPA keeps them fp32; against an fp64 truth it errs max 0.025 / mean
2.2e-3, SDPA 0.019 / 1.1e-3.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import engine.model.attention as attention
from engine.bench.synthetic import REAL_SHAPE
from engine.experts.streaming import GROUP
from engine.kv.cache import LatentKVCache
from engine.model import fused_attention
from engine.model.config import ModelConfig
from engine.model.rope import Rope
from engine.placement import DEFAULT_WORKSPACE_BYTES
from engine.runtime import OFFLOADED_PREFILL_CHUNK
from engine.tiny import TinyShape, model_config
from tests.engine.test_parity import BF16_ATOL, BF16_MEAN, FP32_ATOL, PROMPT_IDS, _ours
from tests.helpers.assert_close import assert_close
from tests.helpers.oracle import reference_model

SHAPE = TinyShape(heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
CFG = ModelConfig.from_hf(model_config(SHAPE))
REAL_CFG = ModelConfig.from_hf(model_config(REAL_SHAPE))
MiB = 2**20


def _reference_expanded(cfg, w, q_nope, q_pe, latent, k_pe, offset):
    """The unblocked form (before key blocking): all S keys expanded at once, one SDPA."""
    n, d, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    s, t = latent.shape[0], q_nope.shape[0]
    kv = F.linear(latent, w.kv_b_proj).view(s, n, d + v)
    key = torch.cat([kv[..., :d], k_pe[:, None, :].expand(s, n, -1)], dim=-1).transpose(0, 1)
    query = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)
    mask = torch.arange(s, device=latent.device)[None, :] <= \
        (torch.arange(t, device=latent.device) + offset)[:, None]
    out = F.scaled_dot_product_attention(query, key, kv[..., d:].transpose(0, 1), attn_mask=mask,
                                         scale=cfg.softmax_scale)
    return out.transpose(0, 1)  # [T, N, V]


def _inputs(cfg, num_tokens, offset, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, d, r, v, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim, cfg.kv_lora_rank)
    s = offset + num_tokens

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    empty = torch.empty(0, dtype=dtype)
    w = attention.AttentionWeights(empty, empty, empty, empty, empty,
                                   rand(n * (d + v), c, scale=c**-0.5), empty)
    return w, rand(num_tokens, n, d), rand(num_tokens, n, r), rand(s, c), rand(s, r)


@pytest.fixture(params=["fused", "materialised"])
def block_path(request, monkeypatch):
    """Long attention through the fused kernels (merged by log-sum-exp) or with scores
    materialised per key block (the fallback when the fused path fails its self-test)."""
    monkeypatch.setattr(fused_attention, "ENABLED", request.param == "fused")
    return request.param


def _force_key_block(monkeypatch, cfg, queries, keys, dtype):
    """Set the budget to exactly `keys` keys per block for `queries`-query blocks."""
    monkeypatch.setattr(attention, "ATTENTION_SCRATCH_BYTES",
                        attention._key_block_bytes(cfg, queries, keys, dtype))
    assert attention.key_block_size(cfg, queries, dtype) == keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("num_tokens", "offset"), [(40, 0), (23, 37), (50, 100)])
def test_key_blocks_match_unblocked(monkeypatch, block_path, dtype, num_tokens, offset):
    """Ragged key blocks of 7 and query blocks of 16, prefill after a cached prefix."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    _force_key_block(monkeypatch, CFG, 16, 7, dtype)
    args = _inputs(CFG, num_tokens, offset, dtype)
    ours = attention._expanded(CFG, *args, offset)
    expected = _reference_expanded(CFG, *args, offset)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    if dtype == torch.float32:
        assert_close("fp32 key blocks", ours, expected, 1e-5)
    else:
        assert_close("bf16 key blocks", ours, expected, 0.05, mean_atol=4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_key_block_is_bit_identical_to_unblocked(dtype):
    """When every visible key fits one block, the path (and result) is the plain one."""
    args = _inputs(CFG, 40, 25, dtype, seed=1)
    assert attention.key_block_size(CFG, 40, dtype) >= 65
    assert torch.equal(attention._expanded(CFG, *args, 25), _reference_expanded(CFG, *args, 25))


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode and still alive; keeps the peak.
    Outputs sharing an input's storage (views, in-place ops) allocate nothing and are skipped."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in inputs and key not in self.live:
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._freed, key)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peak_transient_bytes_stay_within_the_budget(monkeypatch, block_path, dtype):
    """The peak of live tensors made by expanded attention over 2000 keys stays within
    attention_scratch_bytes' core terms; the unblocked form (all keys at once) exceeds them."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    _force_key_block(monkeypatch, CFG, 16, 64, dtype)
    args = _inputs(CFG, 40, 1960, dtype)
    core = attention.attention_core_bytes(CFG, 40, 2000, dtype)
    with _LiveBytes() as ours:
        attention._expanded(CFG, *args, 1960)
    with _LiveBytes() as unblocked:
        _reference_expanded(CFG, *args, 1960)
    assert ours.peak <= core < unblocked.peak, (ours.peak, core, unblocked.peak)
    assert ours.peak <= attention.ATTENTION_SCRATCH_BYTES + core // 2


def test_key_block_size_fits_the_budget_at_real_shapes():
    """One block step fits the budget and the next aligned size would not; a whole offloaded
    prefill chunk (16K tokens) fits the planner's per-GPU workspace up to 256K context, beside
    the chunk's residual and normed input and the expert streaming buffers."""
    for queries in (17, 500, 2048):
        keys = attention.key_block_size(REAL_CFG, queries, torch.bfloat16)
        assert keys % attention.KEY_BLOCK_ALIGN == 0
        step = attention._key_block_bytes(REAL_CFG, queries, keys, torch.bfloat16)
        bigger = attention._key_block_bytes(REAL_CFG, queries, keys + attention.KEY_BLOCK_ALIGN,
                                            torch.bfloat16)
        assert step <= attention.ATTENTION_SCRATCH_BYTES < bigger
    for context in (32768, 131072, 262144):
        # 803 MiB in bf16 however long the context, once it exceeds one key block.
        chunk = attention.attention_scratch_bytes(REAL_CFG, OFFLOADED_PREFILL_CHUNK, context,
                                                  torch.bfloat16)
        residual_and_input = 2 * OFFLOADED_PREFILL_CHUNK * REAL_CFG.hidden_size * 2
        staging = 2 * GROUP * 3 * REAL_CFG.hidden_size * REAL_CFG.moe_intermediate_size
        assert chunk + residual_and_input + staging <= DEFAULT_WORKSPACE_BYTES - 200 * MiB
        # 16 queries through the absorbed form: ~257 MiB (one block of scores was 2 GiB at 256K).
        assert attention.attention_scratch_bytes(REAL_CFG, 16, context, torch.bfloat16) < 260 * MiB


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_key_blocks_keep_oracle_parity(tiny_checkpoint, monkeypatch, block_path, dtype):
    """Query blocks of 5 and key blocks of 3 keys: whole prefill, chunks after a cached prefix
    through the expanded form, and through the absorbed form (also key-blocked here).

    bf16 runs the 16-token prompt of test_parity's bf16 test: at 48 tokens the tiny model's bf16
    logits stray up to ~1.6 from the oracle with or without key blocks (bf16 noise flips its
    expert choices), which says nothing about blocking.
    """
    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)
    model = _ours(tiny_checkpoint, dtype)
    torch_dtype = getattr(torch, dtype)
    _force_key_block(monkeypatch, model.decoder.cfg, 5, 3, torch_dtype)
    assert attention.key_block_size(model.decoder.cfg, 7, torch_dtype, absorbed=True) < 8
    ids, chunk = (PROMPT_IDS * 3, 17) if dtype == "float32" else (PROMPT_IDS, 7)
    ref = reference_model(tiny_checkpoint, torch_dtype)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    runs = {"whole": model.forward(model.embed_ids(ids), model.decoder.new_cache(),
                                   logits_for="all", absorb=False)}
    for absorb in (False, True):
        cache = model.decoder.new_cache()
        runs[f"chunked absorb={absorb}"] = torch.cat([
            model.forward(model.embed_ids(ids[lo : lo + chunk]), cache, logits_for="all",
                          absorb=absorb) for lo in range(0, len(ids), chunk)])
    for name, ours in runs.items():
        if dtype == "float32":
            assert_close(f"tiny key blocks {name}", ours, expected, FP32_ATOL)
        else:
            assert_close(f"tiny key blocks {name}", ours, expected, BF16_ATOL, mean_atol=BF16_MEAN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("num_tokens", "offset"), [(1, 90), (12, 0), (16, 300)])
def test_absorbed_key_blocks_match_unblocked(monkeypatch, dtype, num_tokens, offset):
    """Decode and short chunks at long context: the absorbed form's key blocks of 9 against its
    single-block form, and against the expanded form."""
    args = _inputs(CFG, num_tokens, offset, dtype, seed=2)
    whole = attention._absorbed(CFG, *args, offset)
    expanded = _reference_expanded(CFG, *args, offset)
    monkeypatch.setattr(attention, "ATTENTION_SCRATCH_BYTES",
                        attention._key_block_bytes(CFG, num_tokens, 9, dtype, absorbed=True))
    assert attention.key_block_size(CFG, num_tokens, dtype, absorbed=True) == 9
    ours = attention._absorbed(CFG, *args, offset)
    atol, mean = (1e-5, None) if dtype == torch.float32 else (0.05, 4e-3)
    assert_close("absorbed key blocks", ours, whole, atol, mean_atol=mean)
    assert_close("absorbed key blocks vs expanded", ours, expanded, atol, mean_atol=mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("num_tokens", "offset"), [(40, 1960), (12, 1988)])
def test_mla_attention_peak_within_attention_scratch_bytes(monkeypatch, dtype, num_tokens, offset):
    """All of mla_attention (projections, rope, core, o_proj) against the planner's figure."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    monkeypatch.setattr(attention, "ATTENTION_SCRATCH_BYTES", 64 * 1024)
    gen = torch.Generator().manual_seed(3)
    n, d, r, v, c, q, h = (CFG.num_attention_heads, CFG.qk_nope_head_dim, CFG.qk_rope_head_dim,
                           CFG.v_head_dim, CFG.kv_lora_rank, CFG.q_lora_rank, CFG.hidden_size)
    shapes = [(q, h), (q,), (n * (d + r), q), (c + r, h), (c,), (n * (d + v), c), (h, n * v)]
    w = attention.AttentionWeights(*[(torch.randn(*s, generator=gen) * s[-1] ** -0.5).to(dtype)
                                     for s in shapes])
    cache = LatentKVCache(1, c, r, dtype)
    cache.reserve(offset + num_tokens)
    cache.offset = offset
    x = torch.randn(num_tokens, h, generator=gen).to(dtype)
    tables = attention.PositionTables.build(Rope(CFG), offset, num_tokens, dtype, x.device)
    with _LiveBytes() as live:
        out = attention.mla_attention(CFG, w, x, tables, cache, 0)
    assert torch.isfinite(out).all()
    bound = attention.attention_scratch_bytes(CFG, num_tokens, offset + num_tokens, dtype)
    assert bound // 3 < live.peak <= bound, (live.peak, bound)


def test_fused_path_is_checked_before_use_and_falls_back(monkeypatch):
    """A fused kernel that returns a wrong log-sum-exp fails the self-test, and the
    materialised key-block path serves with the same results."""
    assert fused_attention.usable(torch.device("cpu"), torch.float32)
    real = fused_attention.block_attention

    def broken(query, key, value, causal, scale, kernel=None):
        out, lse = real(query, key, value, causal, scale, kernel)
        return out, lse + 1.0 * (not causal)  # past blocks weighted e times too much

    monkeypatch.setattr(fused_attention, "block_attention", broken)
    monkeypatch.setattr(fused_attention, "_checked", {})
    assert not fused_attention.usable(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    _force_key_block(monkeypatch, CFG, 16, 7, torch.float32)
    args = _inputs(CFG, 23, 37, torch.float32)
    assert_close("fallback", attention._expanded(CFG, *args, 37), _reference_expanded(CFG, *args, 37), 1e-5)


def test_a_fused_kernel_error_on_a_real_call_falls_back_for_good(monkeypatch):
    """The self-test runs small shapes; should the kernel refuse the real ones, that block and
    every later one take the materialised path, with the same results."""
    assert fused_attention.usable(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(fused_attention, "_checked", dict(fused_attention._checked))

    def refuses(*args, **kwargs):
        raise RuntimeError("unsupported head dim")

    monkeypatch.setattr(fused_attention, "block_attention", refuses)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    _force_key_block(monkeypatch, CFG, 16, 7, torch.float32)
    args = _inputs(CFG, 23, 37, torch.float32)
    assert_close("fallback after an error", attention._expanded(CFG, *args, 37),
                 _reference_expanded(CFG, *args, 37), 1e-5)
    assert not fused_attention.usable(torch.device("cpu"), torch.float32)


def test_cuda_kernels_are_tried_in_order_and_the_first_that_passes_serves(monkeypatch):
    """On a GPU, FlashAttention is tried first (half precision only), then the memory-efficient
    kernel; the self-test of each decides (run here with the kernels' outcomes given)."""
    tried = []

    def self_test(device, dtype, kernel):
        tried.append((dtype, kernel))
        return kernel in passing

    monkeypatch.setattr(fused_attention, "_self_test", self_test)
    monkeypatch.setattr(fused_attention, "_checked", {})
    gpu = torch.device("cuda", 0)
    passing = {"efficient"}
    assert fused_attention.usable(gpu, torch.bfloat16)
    assert fused_attention._checked[("cuda:0", torch.bfloat16)] == "efficient"
    assert fused_attention.usable(gpu, torch.float32)  # flash is not tried in fp32
    assert tried == [(torch.bfloat16, "flash"), (torch.bfloat16, "efficient"), (torch.float32, "efficient")]
    passing = {"flash", "efficient"}
    monkeypatch.setattr(fused_attention, "_checked", {})
    assert fused_attention.usable(gpu, torch.bfloat16)
    assert fused_attention._checked[("cuda:0", torch.bfloat16)] == "flash"
    # Flash passed the small self-test but fails on a real call: the efficient kernel, if it
    # passes, serves from then on (not the slow materialised path).
    fused_attention.disable(gpu, torch.bfloat16, RuntimeError("head dim 192 unsupported"))
    assert fused_attention._checked[("cuda:0", torch.bfloat16)] == "efficient"
    fused_attention.disable(gpu, torch.bfloat16, RuntimeError("again"))
    assert not fused_attention.usable(gpu, torch.bfloat16)  # nothing after efficient
    passing = set()
    monkeypatch.setattr(fused_attention, "_checked", {})
    monkeypatch.setattr(fused_attention, "CUDA_KERNELS", ("efficient",))  # as the bench pins it
    assert not fused_attention.usable(gpu, torch.bfloat16)
    assert tried[-1] == (torch.bfloat16, "efficient")


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_cuda_kernels_match_unblocked(monkeypatch, kernel):
    """Each CUDA kernel, pinned as `engine.bench --attention-kernel` pins it, at MLA's widths
    (query/key 192, values 128: FlashAttention pads them) through ragged key blocks after a
    cached prefix."""
    import dataclasses

    cfg = ModelConfig.from_hf(model_config(TinyShape(heads=4, kv_lora_rank=64, qk_nope_head_dim=128,
                                                     qk_rope_head_dim=64, v_head_dim=128)))
    monkeypatch.setattr(fused_attention, "CUDA_KERNELS", (kernel,))
    monkeypatch.setattr(fused_attention, "_checked", {})
    monkeypatch.setattr(attention, "QUERY_BLOCK", 160)
    _force_key_block(monkeypatch, cfg, 160, 128, torch.bfloat16)
    w, *tensors = _inputs(cfg, 300, 350, torch.bfloat16)
    w = dataclasses.replace(w, kv_b_proj=w.kv_b_proj.cuda())
    tensors = [t.cuda() for t in tensors]
    assert fused_attention.usable(torch.device("cuda", 0), torch.bfloat16)
    assert fused_attention._checked[("cuda:0", torch.bfloat16)] == kernel
    ours = attention._expanded(cfg, w, *tensors, 350).float().cpu()
    expected = _reference_expanded(cfg, w, *tensors, 350).float().cpu()
    assert_close(f"cuda {kernel} key blocks", ours, expected, 0.05, mean_atol=4e-3)

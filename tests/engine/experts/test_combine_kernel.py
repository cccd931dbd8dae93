"""The decode combine kernel (engine/experts/combine_kernel.py) without a GPU.

As in test_fp8_kernel: a private copy of the module runs its kernel under Triton's interpreter
on CPU tensors, and the production kernel is compiled for sm_90. The kernel rounds to bf16 on
the bits, so interpreted and eager results must be equal bit for bit (no tolerance).
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.experts import combine_kernel
from tests.helpers.triton_interpreter import QUIET_INTERPRETER, interpreted_copy

pytestmark = QUIET_INTERPRETER


@pytest.fixture(scope="module")
def kernels():
    return interpreted_copy(combine_kernel)


def step(num_experts: int, hidden: int, seed: int = 0, device: str = "cpu"):
    """(ys [n, 1, H], weights [1, K], shared, h): one decode step's MoE outputs, in bf16."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.randn(num_experts, 1, hidden, generator=gen) * 3
    weights = torch.rand(1, 4, generator=gen) * 2
    shared, h = (torch.randn(1, hidden, generator=gen) * 5 for _ in "sh")
    return tuple(t.to(device, torch.bfloat16) for t in (ys, weights, shared, h))


@pytest.mark.parametrize("hidden", [64, 300, 4096])  # one block, ragged, the real width
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1], [3]], ids=["in-order", "shuffled", "one"])
def test_combine_equals_the_eager_path_bit_for_bit(kernels, hidden, order):
    ys, weights, shared, h = step(len(order), hidden)
    ours = kernels.combine(ys, weights, torch.tensor(order, dtype=torch.int32), shared, h)
    assert torch.equal(ours, combine_kernel.eager_combine(ys, weights, order, shared, h))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit where finite, and NaN / inf in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_nan_and_inf_propagate_as_in_the_eager_path(kernels):
    """A layer that blows up must show it: NaN stays NaN, overflow becomes inf, as eagerly."""
    ys, weights, shared, h = step(4, 300)
    ys[1, 0, :10] = float("nan")
    ys[2, 0, 10:20] = float("inf")
    h[0, 20:30] = 3e38  # + routed + shared overflows bf16 to inf
    order = [2, 0, 3, 1]
    ours = kernels.combine(ys, weights, torch.tensor(order, dtype=torch.int32), shared, h)
    expected = combine_kernel.eager_combine(ys, weights, order, shared, h)
    assert expected.isnan().any() and expected.isinf().any()
    assert _same(ours, expected)


def test_eager_combine_is_what_the_decoder_computes():
    """eager_combine is the reference the kernel is held to: the MoE loop plus the residual."""
    from engine.model.moe import run_experts

    ys, weights, shared, h = step(4, 64)
    top_idx = torch.tensor([[7, 2, 9, 4]])  # router order; id order is 2, 4, 7, 9
    order = [1, 3, 0, 2]  # each id-ordered output's column in the router's order
    by_id = dict(zip([2, 4, 7, 9], ys, strict=True))
    routed = run_experts(h, top_idx, weights, lambda e: (lambda xs, y=by_id[e]: y))
    assert torch.equal(combine_kernel.eager_combine(ys, weights, order, shared, h),
                       h + (routed + shared))


def test_a_wrong_order_or_weight_shows(kernels):
    ys, weights, shared, h = step(4, 64)
    good = combine_kernel.eager_combine(ys, weights, [2, 0, 3, 1], shared, h)
    swapped = kernels.combine(ys, weights, torch.tensor([0, 2, 3, 1], dtype=torch.int32), shared, h)
    assert not torch.equal(swapped, good)
    nudged = weights.clone()
    nudged[0, 3] *= 1.01
    assert not torch.equal(kernels.combine(ys, nudged, torch.tensor([2, 0, 3, 1], dtype=torch.int32),
                                           shared, h), good)


def test_self_test_passes_and_catches_a_broken_kernel(kernels, monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert kernels._self_test(cpu)
    combine = kernels.combine
    monkeypatch.setattr(kernels, "combine", lambda ys, w, order, shared, h: combine(ys, w, order, shared, h * 1.01))
    with caplog.at_level(logging.WARNING):
        assert not kernels._self_test(cpu)
    assert "differs from the eager path" in caplog.text


def test_production_never_uses_the_interpreter_or_the_cpu(kernels):
    assert not combine_kernel.combine_usable(torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16"):
        _, weights, shared, h = step(2, 64)
        kernels.combine(torch.zeros(2, 3, 64), weights, torch.tensor([0, 1], dtype=torch.int32),
                        shared, h)


def test_the_kernel_compiles_for_hopper(monkeypatch, tmp_path):
    triton = pytest.importorskip("triton", reason="Triton is not installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    signature = {"ys_ptr": "*bf16", "w_ptr": "*bf16", "order_ptr": "*i32", "shared_ptr": "*bf16",
                 "h_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "H": "i32", "stride_y": "i32",
                 "BLOCK": "constexpr"}
    source = ASTSource(combine_kernel._combine_kernel, signature, {"BLOCK": combine_kernel.BLOCK})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": False})
    assert compiled.asm["cubin"]


@pytest.mark.cuda
def test_combine_on_the_gpu_equals_the_eager_path():
    device = torch.device("cuda", 0)
    assert combine_kernel.combine_usable(device)
    ys, weights, shared, h = step(4, 4096, device="cuda")
    ys[1, 0, :10] = float("nan")  # the GPU's canonical NaN must not round into -0.0
    ys[2, 0, 10:20] = float("inf")
    order = [3, 1, 0, 2]
    ours = combine_kernel.combine(ys, weights, torch.tensor(order, dtype=torch.int32, device=device),
                                  shared, h)
    assert _same(ours, combine_kernel.eager_combine(ys, weights, order, shared, h))

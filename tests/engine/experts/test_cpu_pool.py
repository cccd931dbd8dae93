"""The C expert kernels' own threads (engine/experts/cpu_pool.h): a matrix split into many
spans, several Python threads calling at once, and a forked child, all give the one-thread
result bit for bit."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from engine.experts import cpu_rows, fp8_cpu, nvfp4_cpu
from engine.experts.nvfp4_kernel import random_blob

pytestmark = pytest.mark.skipif(fp8_cpu.kernel() is None or nvfp4_cpu.kernel() is None,
                                reason="needs a C compiler")


def _operands():
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(520, 256, generator=gen) * 30).to(torch.float8_e4m3fn)
    blob, divisors = random_blob(520, 256, gen)
    x = torch.randn(3, 256, generator=gen)
    return weight, blob, divisors, x


def _products(weight, blob, divisors, x):
    fp8, nv = fp8_cpu.kernel(), nvfp4_cpu.kernel()
    codes = torch.empty(weight.shape, dtype=torch.int8)
    peaks = fp8.requantize_int8(weight, codes)
    return [fp8.matmul(x, weight, 0.5), fp8.dequantize(weight, 0.5), codes, peaks,
            nv.matmul(x, blob, divisors), nv.dequantize(blob, divisors)]


@pytest.fixture
def one_thread_result(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    operands = _operands()
    return operands, _products(*operands)


def test_many_spans_on_many_threads_equal_one_thread(one_thread_result, monkeypatch):
    operands, expected = one_thread_result
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)  # more threads than cores
    monkeypatch.setattr(cpu_rows, "MIN_ROWS_PER_THREAD", 8)
    assert cpu_rows.spans(520) == (12, 48)
    for _ in range(3):  # the pool's threads are reused from call to call
        for got, want in zip(_products(*operands), expected, strict=True):
            assert torch.equal(got, want)


def test_python_threads_calling_at_once_each_get_their_own_result(one_thread_result, monkeypatch):
    operands, expected = one_thread_result
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    results: list = [None] * 4

    def call(i: int) -> None:
        results[i] = _products(*operands)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got in results:
        assert got is not None and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_a_pool_of_its_own(one_thread_result, monkeypatch):
    """The parent's pool threads do not exist in a child: it must not wait for them."""
    operands, expected = one_thread_result
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    _products(*operands)  # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # the child: exit at once, whatever happens, with the verdict as status
        ok = False
        try:  # compared as bytes: PyTorch's own thread pool is not usable after a fork
            ok = all(_bytes(a) == _bytes(b) for a, b in zip(_products(*operands), expected, strict=True))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()

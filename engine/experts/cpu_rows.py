"""Row-parallel calls into the C expert kernels (nvfp4_cpu, fp8_cpu): a matrix's output rows
split over `torch.get_num_threads()` threads. ctypes releases the GIL for the length of a call,
so the spans run at once; the threads are the process's own, apart from PyTorch's pool. And the
check of what the kernels read as inputs."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

MIN_ROWS_PER_THREAD = 64  # below this a thread's hand-off costs more than its rows


def over_rows(n: int, run: Callable[[int, int], None]) -> None:
    """run(r0, r1) over [0, n), one span per thread, spans a multiple of 8 rows."""
    threads = max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))
    if threads == 1:
        run(0, n)
        return
    step = (-(-n // threads) + 7) // 8 * 8
    futures = [_pool().submit(run, r0, min(n, r0 + step)) for r0 in range(0, n, step)]
    for future in futures:
        future.result()


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="quire-cpu-experts")


def check_inputs(x: torch.Tensor, k: int) -> None:
    """x must be host tokens [M, K] of the matrix's K: the kernels read M x K floats from it."""
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"the CPU expert kernels take host inputs [M, {k}], not "
                         f"{list(x.shape)} on {x.device}")

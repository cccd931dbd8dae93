"""How the C expert kernels (nvfp4_cpu, fp8_cpu) split a matrix's output rows over threads
(the kernels' own pthreads, engine/experts/cpu_pool.h: one call from Python per matrix), and
the check of what they read as inputs."""

from __future__ import annotations

import torch

MIN_ROWS_PER_THREAD = 64  # below this a thread's hand-off costs more than its rows


def spans(n: int) -> tuple[int, int]:
    """(threads, rows a span) for n output rows: one span per thread of PyTorch's pool size
    (engine.experts.cpu_threads sets it), each a multiple of 8 rows."""
    threads = max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))
    return threads, (-(-n // threads) + 7) // 8 * 8


def check_inputs(x: torch.Tensor, k: int) -> None:
    """x must be host tokens [M, K] of the matrix's K: the kernels read M x K floats from it."""
    if x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"the CPU expert kernels take host inputs [M, {k}], not "
                         f"{list(x.shape)} on {x.device}")

"""How the C expert kernels (nvfp4_cpu, fp8_cpu) split a matrix's output rows over threads
(the kernels' own pthreads, engine/experts/cpu_pool.h: one call from Python per matrix), and
the check of what they read as inputs."""

from __future__ import annotations

import ctypes

import torch

MIN_ROWS_PER_THREAD = 64  # below this a thread's hand-off costs more than its rows


I64, INT, PTR, FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


def bind(lib: ctypes.CDLL, name: str, *leading: type) -> ctypes._CFuncPtr:
    """A whole-matrix entry point of a kernel library with its signature declared: `leading`
    arguments, then the three every such function ends with (rows, threads, rows a span: the
    numbers `spans` gives); it returns nothing."""
    function = getattr(lib, name)
    function.argtypes = [*leading, I64, INT, I64]
    function.restype = None
    return function


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

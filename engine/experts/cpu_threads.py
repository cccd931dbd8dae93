"""How many threads the CPU's share of the experts runs on (PyTorch's intra-op pool, which the
C kernels' row split follows too: engine.experts.cpu_rows).

On a GPU load the decode thread runs beside that work, launching kernels and spinning in CUDA's
synchronisations; with every core also in PyTorch's pool, one pool thread waits for a core at
each parallel region's barrier. Seen on the H200 machine (16 cores) with one other busy
process: int8 experts at 1.6 GB/s with 16 threads against 17-54 GB/s with 8. So a GPU load
leaves one core to the decode thread, unless the user chose a count (`--cpu-threads`, or
OMP_NUM_THREADS in the environment). PyTorch's pool defaults to the physical cores, so a
machine with hyper-threads keeps its pool: the decode thread already has a logical CPU of its own.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

_chosen_by_user = False


def choose(threads: int) -> None:
    """The user's count (-1: every core), kept by every later load."""
    global _chosen_by_user
    torch.set_num_threads(threads if threads > 0 else os.cpu_count() or 1)
    _chosen_by_user = True


def leave_one_core_to_the_gpu() -> None:
    """Before a GPU load measures the CPU's rates (they are stored per thread count)."""
    if _chosen_by_user or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = os.cpu_count() or 1
    threads = min(torch.get_num_threads(), cores - 1)
    if threads >= 2 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("CPU experts on %d threads: one core left to the thread driving the GPU", threads)

"""What the test machine's CPU offers, for the C kernels' tests (engine.native_build)."""

from __future__ import annotations

import platform


def has_avx2_and_fma() -> bool:
    """Whether `-march=native` builds take the AVX2 paths here (x86 Linux; elsewhere False)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags

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


def built_kernel(module, variant: str, cache_dir):
    """A C kernel module's library built as `variant` ("native" or "portable") into cache_dir,
    checked to have built, passed its self-test and taken the AVX2 paths exactly where it may;
    the calling test is skipped without a C compiler."""
    import pytest

    from engine import native_build

    if native_build.compiler() is None:
        pytest.skip("no C compiler on this machine")
    built = module.load(portable=variant == "portable", cache_dir=cache_dir)
    assert built is not None, "the kernel failed to build or its self-test"
    assert built.simd == (variant == "native" and has_avx2_and_fma())
    return built

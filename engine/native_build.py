"""C sources shipped with the engine, compiled once per machine and loaded through ctypes.

PyTorch has no fast CPU kernel for some formats Quire holds (NVFP4 and FP8 experts); a few dozen
lines of C compiled for the machine's own CPU (`-march=native`) serve them tens of times faster
than any composition of PyTorch ops. The library lands in the user cache folder under a name that hashes
the source, the flags, the compiler and the CPU, so an upgrade or another machine sharing the
folder builds its own. Without a C compiler (or when it fails) `build` returns None and callers
keep their PyTorch path: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

COMPILE_TIMEOUT_S = 120
# QUIRE_CPU_KERNELS=off: PyTorch paths only (a baseline for the benchmark, or a way around a
# kernel suspected of a problem). QUIRE_KERNEL_CACHE: another folder for the built libraries.
DISABLE_ENV, CACHE_ENV = "QUIRE_CPU_KERNELS", "QUIRE_KERNEL_CACHE"
NATIVE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-pthread")
PORTABLE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-pthread", "-DQUIRE_PORTABLE")
LIBRARIES = ("-lm",)  # after the source, as linkers want them


def compiler() -> str | None:
    """The C compiler to use: $CC, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("Quire", appauthor=False)) / "kernels"


def _compiler_identity(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()[0] if done.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def cpu_identity() -> str:
    """The CPU's name and feature flags: `-march=native` builds for exactly these, and a cache
    folder shared by machines (a network home) must not hand one CPU another's library."""
    from engine.bench.machine import cpu_name

    features = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            features = next((line for line in f if line.split(":")[0].strip() in ("flags", "Features")), "")
    except OSError:
        pass
    return f"{cpu_name()}|{platform.machine()}|{features.strip()}"


def library_path(source: Path, flags: tuple[str, ...], cc: str, cache_dir: Path) -> Path:
    """The cached library's path: a hash of the source and the headers beside it (it may include
    them), the flags, the compiler and the CPU."""
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = "\n".join([source.read_text(), *headers, " ".join(flags), _compiler_identity(cc),
                     cpu_identity()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{source.stem}-{digest}.so"


def build(source: Path, portable: bool = False, cache_dir: Path | None = None) -> ctypes.CDLL | None:
    """`source` compiled for this machine (or reused from the cache) and loaded; None where
    switched off, no compiler is present, or no build works (logged, with the compiler's words).
    A compiler that refuses `-march=native` gets the portable build instead.
    `portable`: plain C, no vector intrinsics (the fallback, and what tests compare against)."""
    if os.environ.get(DISABLE_ENV, "").lower() in ("off", "0", "no"):
        log.info("%s=off: %s runs on its PyTorch path", DISABLE_ENV, source.name)
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found: %s runs on its slower PyTorch path", source.name)
        return None
    for flags in (PORTABLE_FLAGS,) if portable else (NATIVE_FLAGS, PORTABLE_FLAGS):
        try:
            return _built(cc, source, flags, cache_dir or default_cache_dir())
        except (OSError, subprocess.SubprocessError, UnicodeError) as exc:
            log.warning("could not build %s with %s (%s)", source.name, " ".join(flags), exc)
    log.warning("%s runs on its slower PyTorch path", source.name)
    return None


def load_checked(source: Path, make: Callable[[ctypes.CDLL], T], self_test: Callable[[T], str],
                 portable: bool = False, cache_dir: Path | None = None) -> T | None:
    """make(the built library), if self_test passes it ("" = agrees with PyTorch); else None,
    logged: PyTorch's path serves. A library missing a function counts as a failed test."""
    lib = build(source, portable=portable, cache_dir=cache_dir)
    if lib is None:
        return None
    try:
        kernel = make(lib)
        problem = self_test(kernel)
    except (AttributeError, OSError, ValueError, RuntimeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        log.warning("%s disagrees with PyTorch (%s): PyTorch serves instead", source.name, problem)
        return None
    return kernel


def _built(cc: str, source: Path, flags: tuple[str, ...], cache_dir: Path) -> ctypes.CDLL:
    target = library_path(source, flags, cc, cache_dir)
    if not target.exists():
        _compile(cc, source, flags, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError:  # e.g. a damaged cache file: removed, so the next start builds it again
        with contextlib.suppress(OSError):
            target.unlink()
        raise


def _compile(cc: str, source: Path, flags: tuple[str, ...], target: Path) -> None:
    """Compile into a temporary name beside the target, then rename: two processes building at
    once each finish with a whole library, and a crash leaves no half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(source), *LIBRARIES], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-400:] or f"exit {done.returncode}")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():  # else another process's library is in place (and in use)
                raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

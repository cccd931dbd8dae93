"""C sources shipped with the engine, compiled once per machine and loaded through ctypes.

PyTorch has no fast CPU kernel for some formats Quire holds (NVFP4 and FP8 experts); a few dozen
lines of C compiled for the machine's own CPU (`-march=native`) serve them tens of times faster
than any composition of PyTorch ops. The library lands in the user cache folder under a name that hashes
the source, the flags, the compiler and the CPU, so an upgrade or another machine sharing the
folder builds its own. Without a C compiler (or when it fails) `build` returns None and callers
keep their PyTorch path: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 120
# QUIRE_CPU_KERNELS=off: PyTorch paths only (a baseline for the benchmark, or a way around a
# kernel suspected of a problem).
DISABLE_ENV = "QUIRE_CPU_KERNELS"
NATIVE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11")
PORTABLE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-DQUIRE_PORTABLE")


def compiler() -> str | None:
    """The C compiler to use: $CC, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("Quire", appauthor=False)) / "kernels"


def _compiler_identity(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()[0] if done.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def library_path(source: Path, flags: tuple[str, ...], cc: str, cache_dir: Path) -> Path:
    from engine.bench.machine import cpu_name

    key = "\n".join([source.read_text(), " ".join(flags), _compiler_identity(cc), cpu_name()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"{source.stem}-{digest}.so"


def build(source: Path, portable: bool = False, cache_dir: Path | None = None) -> ctypes.CDLL | None:
    """`source` compiled for this machine (or reused from the cache) and loaded; None where no
    compiler is present or the build fails (logged once, with the compiler's words).
    `portable`: plain C, no vector intrinsics (the fallback, and what tests compare against)."""
    if os.environ.get(DISABLE_ENV, "").lower() in ("off", "0", "no"):
        log.info("%s=off: %s runs on its PyTorch path", DISABLE_ENV, source.name)
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found: %s runs on its slower PyTorch path", source.name)
        return None
    flags = PORTABLE_FLAGS if portable else NATIVE_FLAGS
    cache_dir = cache_dir or default_cache_dir()
    target = library_path(source, flags, cc, cache_dir)
    if not target.exists():
        try:
            _compile(cc, source, flags, target)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not build %s (%s): it runs on its slower PyTorch path", source.name, exc)
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:  # e.g. a damaged cache file: rebuilt on the next start
        log.warning("could not load %s (%s)", target, exc)
        target.unlink(missing_ok=True)
        return None


def _compile(cc: str, source: Path, flags: tuple[str, ...], target: Path) -> None:
    """Compile into a temporary name beside the target, then rename: two processes building at
    once each finish with a whole library, and a crash leaves no half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-400:] or f"exit {done.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Private copies of kernel modules whose Triton kernels run under the interpreter on CPU
tensors. Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so the copy is
imported with it set; the production module stays as production imports it."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch

# Triton < 3.8's interpreter turns one-element arrays into ints with int(): harmless, and numpy
# deprecates it. Tested with Triton 3.6, 3.8 and 3.9. For a kernel test module's pytestmark.
QUIET_INTERPRETER = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def interpreted_kernels(module: ModuleType):
    """A module-scoped `kernels` fixture: `module`'s interpreted copy, checked to be one (a kernel
    test module says `kernels = interpreted_kernels(fp8_kernel)`)."""

    @pytest.fixture(scope="module")
    def kernels() -> ModuleType:
        copy = interpreted_copy(module)
        # The copy's own flags: its kernels run under the interpreter, on CPU tensors.
        assert copy.INTERPRETED and getattr(copy, "KERNEL_AVAILABLE", True)
        return copy

    return kernels


def interpreted_copy(module: ModuleType) -> ModuleType:
    """`module` imported again with TRITON_INTERPRET=1 (skips the test without Triton 3.6+)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e "
                                 "'.[test]' on Linux x86_64 brings it)")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6):
        pytest.skip(f"Triton {triton.__version__}'s interpreter is untested here (3.6 and newer)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location(f"{module.__name__}_interpreted", module.__file__)
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
    return copy


def assert_self_test_catches_broken_kernels(kernels: ModuleType, shape: tuple[int, int], grouped: bool,
                                            monkeypatch, caplog, name: str) -> None:
    """An expert kernel module's self-test (`_self_test(device, hidden, width, grouped)`) passes
    its interpreted kernels, and disables them when `_launch` is 10% off or raises."""
    import logging

    cpu = torch.device("cpu")
    assert kernels._self_test(cpu, *shape, grouped)
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *args, **kwargs: launch(*args, **kwargs) * 1.1)
    with caplog.at_level(logging.WARNING):
        assert not kernels._self_test(cpu, *shape, grouped)
    assert "disagrees with the eager path" in caplog.text
    monkeypatch.setattr(kernels, "_launch", lambda *args, **kwargs: 1 / 0)
    with caplog.at_level(logging.WARNING):
        assert not kernels._self_test(cpu, *shape, grouped)
    assert f"{name} expert kernel unavailable" in caplog.text


def assert_production_never_interprets(module: ModuleType, kernels: ModuleType, shape: tuple[int, int]) -> None:
    """The production module is compiled Triton, and an interpreted copy never serves (on the CPU,
    nor given a GPU: it is numpy, far too slow)."""
    assert not module.INTERPRETED
    for m in (module, kernels):
        assert not m.kernel_usable(torch.device("cpu"), *shape)
        assert not m.grouped_kernel_usable(torch.device("cpu"), *shape)
    assert not kernels.grouped_kernel_usable(torch.device("cuda", 0), *shape)


def tokens(count: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def rel_errors(ours: torch.Tensor, refs: list[torch.Tensor]) -> list[float]:
    """Per expert: max |ours - ref| / max |ref| (NaN counts as huge)."""
    assert ours.dtype == torch.bfloat16 and ours.shape == (len(refs), *refs[0].shape)
    return [float(torch.nan_to_num((o.float() - r.float()).abs().max() / r.float().abs().max(),
                                   nan=1e9)) for o, r in zip(ours, refs, strict=True)]

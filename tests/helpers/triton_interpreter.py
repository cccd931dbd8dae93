"""Private copies of kernel modules whose Triton kernels run under the interpreter on CPU
tensors. Triton reads TRITON_INTERPRET when a kernel is decorated (at import), so the copy is
imported with it set; the production module stays as production imports it."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

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

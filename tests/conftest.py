"""Shared fixtures: tiny checkpoints in the real layout (built once per session), and a guard
that fails any test leaving an engine thread running."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The C expert kernels build into the test run's own folder, never the user's cache.
os.environ.setdefault("QUIRE_KERNEL_CACHE", tempfile.mkdtemp(prefix="quire-kernels-"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tokenizer files (independent of the model shape; a few seconds to build)."""
    from engine.tiny_tokenizer import write_tokenizer_files

    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory, tokenizer_dir):
    """Factory: make_tiny(**TinyShape fields) -> folder (cached per shape for the session)."""
    from engine.tiny import TinyShape, write_tiny_checkpoint

    made: dict[TinyShape, Path] = {}

    def make(**shape_fields) -> Path:
        shape = TinyShape(**shape_fields)
        if shape not in made:
            out = tmp_path_factory.mktemp("tiny")
            made[shape] = write_tiny_checkpoint(out, shape, tokenizer_from=tokenizer_dir)
        return made[shape]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_tiny) -> Path:
    """The default tiny checkpoint (2 layers, 8 experts top-2, real tokenizer)."""
    return make_tiny()


@pytest.fixture(autouse=True)
def _no_leaked_engine_threads():
    yield
    leaked = [t for t in threading.enumerate() if t.name == "quire-engine" and t.is_alive()]
    for t in leaked:
        t.join(timeout=10)
    leaked = [t for t in leaked if t.is_alive()]
    if leaked:
        pytest.fail(f"test left {len(leaked)} engine thread(s) running; close the service")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on machines without an NVIDIA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def dequantised_cpu_misses(monkeypatch):
    """CPU misses computed as the slots compute them (dequantise, then PyTorch's matmul), so that
    where an expert runs can be held to bit-identical results. The C kernels' fp32 products
    (engine.experts.fp8_cpu, nvfp4_cpu) differ from those at the level of bf16 rounding; their
    own tests hold them to PyTorch, and the parity tests to transformers."""
    from engine.experts import fp8_cpu, nvfp4_cpu

    for module in (fp8_cpu, nvfp4_cpu):
        monkeypatch.setattr(module, "MAX_MATMUL_TOKENS", 0)


@pytest.fixture
def three_cpu_threads():
    """torch.get_num_threads() == 3 for the test: the C kernels split rows over that many."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)

"""python -m engine.check: a model folder checked from its headers, and its plan on this machine."""

from __future__ import annotations

import shutil

import pytest

from engine import check, native_build, planning
from engine.checkpoint import Checkpoint
from engine.experts import nvfp4_cpu
from engine.placement import GpuInfo


def test_an_fp8_release_folder_is_whole_and_fits(tiny_checkpoint, capsys):
    assert check.main([str(tiny_checkpoint), "--device", "cpu", "--context-length", "4096"]) == 0
    out = capsys.readouterr().out
    assert "the FP8 release (config.json, model shards)" in out
    assert "2 layers, 8 routed experts per layer (top 2)" in out and "vision encoder" in out
    assert "every tensor present and whole" in out and out.count("\n  cpu: ") >= 5
    assert "Fits. " in out and "KV cache (4,096 tokens)" in out
    if native_build.compiler():
        assert "CPU kernel for FP8 experts: built for this CPU" in out


def test_an_nvfp4_release_folder_is_named_and_its_cpu_plan_warned(tokenizer_dir, tmp_path, capsys,
                                                                  monkeypatch):
    from engine.tiny_native import write_tiny_nvfp4_checkpoint

    folder = write_tiny_nvfp4_checkpoint(tmp_path / "nvfp4", tokenizer_from=tokenizer_dir)
    # As the real model on a workstation: its experts too large to keep dequantised in RAM.
    monkeypatch.setattr(planning, "cpu_keeps_experts_resident", lambda ckpt, available: False)
    monkeypatch.setattr(nvfp4_cpu, "kernel", lambda: None)  # a machine without a C compiler
    assert check.main([str(folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Mistral's NVFP4 release" in out and "Without a GPU, NVFP4 experts are computed slowly" in out
    assert "CPU kernel for NVFP4 experts: not built" in out and "Install gcc or clang" in out


def test_a_truncated_copy_says_which_file_to_copy_again(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])  # a copy from a removable drive that stopped
    assert check.main([str(folder), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{shard.name} in {folder} is truncated" in err and "Copy this file again" in err


def test_a_plan_that_does_not_fit_exits_1_and_says_what_to_change(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(planning, "detect_gpus", lambda *indices: [GpuInfo(0, "small GPU", 2**30, 2**30)])
    assert check.main([str(tiny_checkpoint), "--device", "cuda", "--gpu-budget", "1MiB"]) == 1
    out = capsys.readouterr().out
    assert "Does not fit: " in out and "exceeds its budget" in out and "raise the GPU budget" in out


def test_a_bad_budget_is_refused(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        check.main([str(tiny_checkpoint), "--gpu-budget", "lots"])
    assert exc.value.code == 2 and "lots" in capsys.readouterr().err


def test_a_named_card_is_the_only_one_planned_on_or_queried(tiny_checkpoint, monkeypatch, capsys):
    """--device cuda:1 plans on card 1 alone (not spread over every card), and the other card is
    not queried (a query makes a CUDA context that would hold ~0.5 GB of it)."""
    cards = [GpuInfo(0, "card 0", 8 * 2**30, 8 * 2**30), GpuInfo(1, "card 1", 8 * 2**30, 8 * 2**30)]
    asked: list[tuple[int, ...]] = []
    monkeypatch.setattr(planning, "detect_gpus",
                        lambda indices=(): asked.append(indices) or [g for g in cards if not indices or g.index in indices])
    monkeypatch.setattr(planning, "detect_host_memory", lambda: (64 * 10**9, 48 * 10**9))
    plan = planning.make_plan(Checkpoint.open(tiny_checkpoint), "cuda:1", None, 4096)
    assert asked == [(1,)]
    assert {t.gpu_index for t in plan.targets} == {1}

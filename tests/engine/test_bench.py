"""The benchmark runs end to end on the CPU (the figures that matter come from a GPU) and
prints one JSON object with the llama-bench-style fields, hit rates and the baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine import native_build


def test_bench_json_on_cpu(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--model", str(tiny_checkpoint), "--device", "cpu",
         "--depth", "0,128", "--prefill", "96", "--chunk", "64", "--tokens", "6", "--warmup", "2",
         "--routing", "synthetic", "--expert-cache-slots", "3", "--baseline", "hf",
         "--baseline-tokens", "2", "--followup", "200", "--question-tokens", "8",
         "--work-dir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    tests = [r["test"] for r in result["results"]]
    assert tests == ["tg6 @ d0", "tg6 @ d128", "pp96", "followup8 @ d200"]
    for row in result["results"][:3]:
        assert row["avg_ts"] > 0 and "stddev_ts" in row
    followup = result["results"][3]
    assert followup["ttft_cached_s"] < followup["ttft_full_reprefill_s"]
    assert followup["snapshot_bytes"] > 0 and followup["snapshot_restore_s"] > 0
    decode = result["results"][0]
    assert 0.0 <= decode["hit_rate"] <= 1.0
    assert 0.0 <= decode["hit_rate"] <= decode["belady_bypass_hit_rate"] + 0.35
    assert decode["bytes_copied_per_token"] + decode["bytes_cpu_per_token"] > 0
    assert decode["wait_routing_s_per_token"] >= 0 and decode["wait_cpu_s_per_token"] >= 0
    assert result["model"]["scaled_to_layers"] == 36 and result["model"]["layers_measured"] == 2
    assert result["baseline"]["tg_ts"] > 0 and result["speedup_vs_baseline"] > 0
    assert set(result["machine"]["cpu_expert_bytes_per_s"]) == {"fp8", "int8", "nvfp4"}
    assert all(rate > 0 for rate in result["machine"]["cpu_expert_tokens_per_s"].values())
    assert result["host_format"] == "int8"  # "auto" with offloaded experts
    assert set(result["attention_kernels"].values()) <= {"cpu", None}  # no CUDA kernel on a CPU
    if native_build.compiler():  # Quire's C kernels serve the FP8 and NVFP4 experts
        assert set(result["cpu_kernels"].values()) <= {"avx2", "portable"}


def test_synthetic_real_shape_config_is_the_real_one():
    from engine.bench.synthetic import REAL_SHAPE
    from engine.tiny import model_config

    text = model_config(REAL_SHAPE)["text_config"]
    assert (text["hidden_size"], text["n_routed_experts"], text["num_experts_per_tok"]) == (4096, 128, 4)
    assert (text["q_lora_rank"], text["kv_lora_rank"], text["moe_intermediate_size"]) == (1024, 256, 2048)
    expert_bytes = 3 * text["hidden_size"] * text["moe_intermediate_size"]
    assert expert_bytes == 25_165_824


def test_bench_with_prefetch_and_another_policy(tiny_checkpoint, tmp_path):
    """The prefetch and policy switches reach the runtime and their counters reach the JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--model", str(tiny_checkpoint), "--device", "cpu",
         "--depth", "0", "--prefill", "", "--tokens", "6", "--warmup", "2", "--routing", "synthetic",
         "--expert-cache-slots", "3", "--prefetch", "--prefetch-error", "0", "--policy", "lrfu",
         "--profile", "--cpu-threads", "1", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    decode = result["results"][0]
    assert decode["prefetch_issued"] > 0 and decode["prefetch_wasted"] == 0  # exact predictions
    assert result["config"]["policy"] == "lrfu" and result["cuda_graphs"] is False
    assert result["machine"]["cpu_threads"] == 1
    report = (tmp_path / "decode.profile.txt").read_text()  # --profile without --out
    assert result["profile_file"] == str(tmp_path / "decode.profile.txt")
    assert "by host time" in report and "aten::" in report


def test_bench_measures_the_int4_format(make_tiny, tmp_path):
    """--host-format int4 reaches the store; the JSON says so, with the format's expert size and
    the CPU's int4 rate; mmap with a requantised format is refused before any work."""
    folder = make_tiny(moe_intermediate=64)
    args = [sys.executable, "-m", "engine.bench", "--model", str(folder), "--device", "cpu",
            "--depth", "0", "--prefill", "", "--tokens", "4", "--warmup", "1", "--routing", "random",
            "--expert-cache-slots", "2", "--host-format", "int4", "--work-dir", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["host_format"] == "int4"
    fp8_bytes = 3 * 64 * 64  # hidden 64, expert width 64, one byte per weight
    assert result["expert_bytes"] == fp8_bytes * 9 // 16
    assert set(result["machine"]["cpu_expert_bytes_per_s"]) == {"fp8", "int8", "int4", "nvfp4"}
    refused = subprocess.run(args + ["--host-mode", "mmap"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--host-mode pinned" in refused.stderr


def test_bench_on_an_nvfp4_release_folder(tokenizer_dir, tmp_path):
    """An NVFP4 release folder (here with engine.tiny_native's random-byte experts, as the
    synthetic real-shape benchmark writes them) runs with its experts as shipped."""
    from engine.experts import nvfp4
    from engine.tiny import TinyShape
    from engine.tiny_native import write_tiny_nvfp4_checkpoint

    folder = write_tiny_nvfp4_checkpoint(tmp_path / "nvfp4", TinyShape(fast_experts=1),
                                         tokenizer_from=tokenizer_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--model", str(folder), "--device", "cpu", "--depth", "0",
         "--prefill", "", "--tokens", "4", "--warmup", "1", "--routing", "random",
         "--expert-cache-slots", "2", "--baseline", "hf", "--baseline-tokens", "2",
         "--no-cpu-kernels", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["host_format"] == "nvfp4" and result["baseline"]["tg_ts"] > 0
    assert result["cpu_kernels"] == {"fp8": None, "nvfp4": None}  # --no-cpu-kernels: PyTorch's paths
    assert result["expert_bytes"] == 2 * 32 * nvfp4.blob_width(64) + 64 * nvfp4.blob_width(32)
    assert result["results"][0]["avg_ts"] > 0


def test_a_prefill_size_of_zero_is_refused_with_the_way_to_measure_none(capsys):
    import pytest

    from engine.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--prefill", "0", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--prefill '' measures none" in capsys.readouterr().err


def test_a_synthetic_folder_appears_only_when_whole(tmp_path, tokenizer_dir):
    """Written as NAME.partial and renamed when whole: a run killed mid-write leaves nothing a
    later configuration would load as a model (it is written again), and a whole one is reused."""
    from engine.bench.synthetic import synthetic_checkpoint
    from engine.checkpoint import Checkpoint
    from engine.tiny import TinyShape

    stale = tmp_path / "ms4-synthetic-1L.partial"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # what a killed write left
    folder = synthetic_checkpoint(tmp_path, 1, tokenizer_from=tokenizer_dir, shape=TinyShape())
    assert folder.name == "ms4-synthetic-1L" and not stale.exists()
    assert Checkpoint.open(folder).config.num_hidden_layers == 1
    marker = folder / "reused"
    marker.write_text("")
    assert synthetic_checkpoint(tmp_path, 1, tokenizer_from=tokenizer_dir, shape=TinyShape()) == folder
    assert marker.exists()


def test_bench_profiles_a_prefill_chunk_after_a_warm_up(tiny_checkpoint, tmp_path):
    """--profile with --prefill: one chunk's tables beside the JSON (where a GPU prefill's time
    goes); the measured prefill comes after an unmeasured warm-up chunk."""
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--model", str(tiny_checkpoint), "--device", "cpu",
         "--depth", "", "--prefill", "96", "--chunk", "64", "--expert-cache-slots", "2",
         "--profile", "--work-dir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    report = (tmp_path / "run.prefill-profile.txt").read_text()
    assert result["prefill_profile_file"] == str(tmp_path / "run.prefill-profile.txt")
    assert report.startswith("prefill profile: one 64-token chunk") and "aten::" in report
    assert "prefill warm-up" in proc.stderr
    assert result["results"][0]["test"] == "pp96"


def test_the_ceiling_of_a_pcie_only_run_is_reported_beside_the_others():
    """--no-cpu-misses: achieved over the PCIe-only ceiling, every path's ceiling still given;
    a format without a measured CPU rate has a CPU ceiling of 0 (the H200 run crashed here)."""
    from argparse import Namespace
    from types import SimpleNamespace

    from engine.bench.__main__ import ceiling

    mach = {"pcie_pinned_bytes_per_s": 55e9, "hbm_bytes_per_s": 4e12,
            "cpu_expert_bytes_per_s": {"int8": 20e9}}
    cfg = SimpleNamespace(num_experts_per_tok=4)
    row = {"hit_rate": 0.2, "avg_ts": 10.0}
    pcie_only = ceiling(mach, row, cfg, Namespace(no_cpu_misses=True), "int8", 25 << 20)
    assert pcie_only["path"] == "pcie" and 0 < pcie_only["pcie_only_ts"] < pcie_only["hybrid_ts"]
    assert pcie_only["achieved_over_ceiling"] == pytest.approx(10.0 / pcie_only["pcie_only_ts"])
    no_rate = ceiling(mach, row, cfg, Namespace(no_cpu_misses=True), "fp8", 25 << 20)
    assert no_rate["cpu_only_ts"] == 0.0 and no_rate["hybrid_ts"] == no_rate["pcie_only_ts"]

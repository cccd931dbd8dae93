"""The acceptance-matrix runner works end to end (tiny sizes on the CPU: a pipeline check)."""

from __future__ import annotations

import json

import pytest

from engine.bench.suite import FULL, figure, run_suite


def test_suite_runs_every_configuration_and_reports_each_target(make_tiny, tokenizer_dir, tmp_path):
    from engine.tiny import TinyShape
    from engine.tiny_native import write_tiny_nvfp4_checkpoint

    # Expert widths of 64: the int4 configurations need multiples of the 64-input groups.
    nvfp4 = write_tiny_nvfp4_checkpoint(tmp_path / "nvfp4", TinyShape(fast_experts=1),
                                        tokenizer_from=tokenizer_dir)
    summary = run_suite(tmp_path, quick=True, model=make_tiny(moe_intermediate=64), nvfp4_model=nvfp4)
    assert [r["error"] for r in summary if r["error"]] == []
    assert len(summary) == sum(len(checks) for _, _, checks in FULL)
    missing = [r["figure"] for r in summary if r["value"] is None]
    assert missing == ["achieved / ceiling"]  # needs PCIe and HBM bandwidths: a CUDA GPU
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_figure_paths():
    result = {"results": [{"hit_rate": 0.4, "belady_bypass_hit_rate": 0.5, "n_prompt": 100,
                           "avg_ts": 50.0}], "ceiling": {"achieved_over_ceiling": 0.9}}
    assert figure(result, "results.0.hit_rate_over_belady") == 0.8
    assert figure(result, "results.0.measured_s_scaled") == 2.0
    assert figure(result, "ceiling.achieved_over_ceiling") == 0.9
    assert figure(result, "speedup_vs_baseline") is None


def test_a_configuration_that_hangs_is_reported_and_the_rest_run(tiny_checkpoint, tmp_path):
    """A device call has a hard limit: one stuck benchmark must not take the whole matrix."""
    summary = run_suite(tmp_path, quick=True, model=tiny_checkpoint,
                        only=("decode-70g-trace", "decode-70g"), config_timeout=0.01)
    assert [r["config"] for r in summary] == ["decode-70g-trace", "decode-70g"]  # as asked
    assert all("timed out" in r["error"] and not r["met"] for r in summary)


def test_unknown_configuration_names_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown configurations: decode-1g"):
        run_suite(tmp_path, quick=True, model=None, only=("decode-70g", "decode-1g"))


def test_the_device_check_runs_every_configuration_once():
    """.ci/device-check's default list (its order is the priority on a short GPU lease) names
    each suite configuration exactly once, so a new one cannot be left unmeasured."""
    import re
    from pathlib import Path

    script = (Path(__file__).parents[2] / ".ci" / "device-check").read_text()
    names = re.search(r"only=\$\{1:-([^}]*)\}", script).group(1).split(",")
    assert sorted(names) == sorted(name for name, _, _ in FULL)


def test_the_device_checks_whole_list_writes_one_summary_and_a_log_each(tmp_path):
    """Every configuration named at once (as .ci/device-check does): the summary's file name
    does not grow with the list (it once passed the 255-character limit after the first
    configuration), and each configuration leaves its full log."""
    names = tuple(name for name, _, _ in FULL)
    summary = run_suite(tmp_path, quick=True, model=None, only=names, config_timeout=0.01)
    assert {r["config"] for r in summary} == set(names)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert all("timed out" in (tmp_path / f"{name}.log").read_text() for name in names)


def test_a_benchmark_cut_short_leaves_what_it_measured(tiny_checkpoint, tmp_path, monkeypatch):
    """The JSON is saved after each stage: a run that dies in its prefill (or is killed by a
    device call's limit) still has its decode rows; a baseline that cannot run is recorded
    beside the figures instead of losing them."""
    from engine.bench import __main__ as bench
    from engine.bench import baseline

    out = tmp_path / "bench.json"
    common = ["--model", str(tiny_checkpoint), "--device", "cpu", "--depth", "0", "--tokens", "2",
              "--warmup", "1", "--expert-cache-slots", "2", "--work-dir", str(tmp_path), "--out", str(out)]

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(bench, "prefill_run", killed)
    with pytest.raises(RuntimeError, match="killed"):
        bench.main([*common, "--prefill", "32", "--baseline", "none"])
    assert [r["test"] for r in json.loads(out.read_text())["results"]] == ["tg2 @ d0"]
    monkeypatch.setattr(baseline, "hf_decode", lambda *a: (_ for _ in ()).throw(ImportError("no accelerate")))
    assert bench.main([*common, "--prefill", "", "--baseline", "hf"]) == 0
    result = json.loads(out.read_text())
    assert result["baseline_error"] == "ImportError: no accelerate" and result["results"][0]["avg_ts"] > 0
    assert "speedup_vs_baseline" not in result

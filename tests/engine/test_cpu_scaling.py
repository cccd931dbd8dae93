"""The CPU thread-scaling table (engine/bench/cpu_scaling.py)."""

from __future__ import annotations

import json

import torch

from engine.bench import cpu_scaling


def test_default_counts_are_every_core_one_free_half_and_a_quarter():
    assert cpu_scaling.default_thread_counts(16) == [16, 15, 8, 4]
    assert cpu_scaling.default_thread_counts(2) == [2, 1]
    assert cpu_scaling.default_thread_counts(1) == [1]


def test_each_format_is_measured_at_each_count_and_the_pool_restored(monkeypatch, tmp_path, capsys):
    seen = []

    def rate(hidden, width, dtype, fmt):
        seen.append((fmt, torch.get_num_threads()))
        return 1e9 * torch.get_num_threads() * (2 if fmt == "int8" else 1)

    monkeypatch.setattr(cpu_scaling, "cpu_expert_bandwidth", rate)
    before = torch.get_num_threads()
    out = tmp_path / "scaling.json"
    assert cpu_scaling.main(["--threads", "2,1", "--formats", "int8,fp8", "--out", str(out)]) == 0
    assert torch.get_num_threads() == before
    assert sorted(set(seen)) == [("fp8", 1), ("fp8", 2), ("int8", 1), ("int8", 2)]
    table = json.loads(out.read_text())["gb_per_s"]
    assert table == {"int8": {"2": 4.0, "1": 2.0}, "fp8": {"2": 2.0, "1": 1.0}}
    assert "int8" in capsys.readouterr().out

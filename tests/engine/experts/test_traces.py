"""Routing traces: file round trips, generator statistics against the published targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError
from engine.experts.policy import LRUPolicy, belady_hit_rate, simulate
from engine.experts.traces import (
    lru_hit_curves,
    predicted_next_layer,
    random_trace,
    read_trace,
    routing_counts,
    synthetic_trace,
    trace_stats,
    write_trace,
)


def assert_valid(trace: np.ndarray, num_experts: int) -> None:
    assert trace.min() >= 0 and trace.max() < num_experts
    ordered = np.sort(trace, axis=-1)
    assert (np.diff(ordered, axis=-1) > 0).all()  # K distinct experts per token and layer


def test_random_trace_shape_and_determinism() -> None:
    trace = random_trace(50, 3, 16, 4, seed=7)
    assert trace.shape == (50, 3, 4)
    assert_valid(trace, 16)
    assert np.array_equal(trace, random_trace(50, 3, 16, 4, seed=7))
    assert not np.array_equal(trace, random_trace(50, 3, 16, 4, seed=8))


@pytest.fixture(scope="module")
def ms4_stats() -> object:
    return trace_stats(synthetic_trace(2000, seed=1), 128)


def test_synthetic_trace_is_valid_and_seeded() -> None:
    trace = synthetic_trace(100, num_layers=6, seed=5)
    assert trace.shape == (100, 6, 4)
    assert_valid(trace, 128)
    assert np.array_equal(trace, synthetic_trace(100, num_layers=6, seed=5))


def test_random_trace_has_no_locality() -> None:
    stats = trace_stats(random_trace(1500, 8, 128, 4, seed=2), 128)
    assert stats.adjacent_reuse == pytest.approx(4 / 128, abs=0.004)
    assert stats.lru_hit_15 == pytest.approx(19 / 128, abs=0.02)
    assert stats.hot_list_lift == pytest.approx(1.0, abs=0.15)


def test_synthetic_trace_hits_the_calibration_targets(ms4_stats) -> None:
    s = ms4_stats
    # Measured (seed 1): LRU@15% 0.40, reuse 3.3x chance, lift 1.6, active 1.0.
    assert 0.35 <= s.lru_hit_15 <= 0.45  # planning range 35-55%, lower half for MS4
    assert 2.0 <= s.adjacent_reuse / s.chance_reuse <= 4.0  # published ~2x; see docstring
    assert 1.3 <= s.hot_list_lift <= 2.3  # llama.cpp #27861: ~1.6x
    assert s.active_fraction_1300 >= 0.95  # #28545: 98.6%
    early, late = np.mean(s.lru_hit_by_layer[:12]), np.mean(s.lru_hit_by_layer[-12:])
    assert late > early + 0.02  # later layers route narrower


def test_belady_gap_matches_published_ratio() -> None:
    # 2608.18261: LRU 65.9% vs Belady 79.1% -> Belady misses 0.61x LRU's; 2608.07911: 0.54-0.56x
    # of the best causal policy. Measured here: 0.52x LRU's at 15%.
    trace = synthetic_trace(1000, seed=4)
    lru = simulate(LRUPolicy(slots_per_layer=[19] * 36), trace)
    optimum = belady_hit_rate(trace, 19)
    assert 0.4 <= (1 - optimum) / (1 - lru) <= 0.7


def test_high_locality_preset_is_more_local(ms4_stats) -> None:
    high = trace_stats(synthetic_trace(1000, seed=1, locality="high"), 128)
    assert high.lru_hit_15 > ms4_stats.lru_hit_15 + 0.15
    assert high.adjacent_reuse > 2 * ms4_stats.adjacent_reuse


def test_lru_curves_match_a_simulated_lru() -> None:
    trace = synthetic_trace(300, num_layers=3, seed=2)
    curves = lru_hit_curves(trace, 128)
    assert curves.shape == (3, 129) and (np.diff(curves, axis=1) >= 0).all()
    assert curves[:, 0].sum() == 0 and curves[:, 128] == pytest.approx(
        1 - (routing_counts(trace, 128) > 0).sum(axis=1) / (300 * 4))
    for slots in (4, 19, 50):
        simulated = simulate(LRUPolicy(slots_per_layer=[slots] * 3), trace)
        assert curves[:, slots].mean() == pytest.approx(simulated, abs=1e-12)


def test_routing_counts() -> None:
    trace = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], dtype=np.int16)
    counts = routing_counts(trace, 4)
    assert counts.tolist() == [[1, 2, 1, 0], [1, 0, 1, 2]]


def test_predicted_next_layer_error_rate() -> None:
    trace = random_trace(400, 6, 128, 4, seed=1)
    pred = predicted_next_layer(trace, 128, error_rate=0.2, seed=0)
    agree = (pred[:, :-1] == trace[:, 1:]).mean()
    assert agree == pytest.approx(0.8 + 0.2 / 128, abs=0.02)
    assert (predicted_next_layer(trace, 128, error_rate=0.0)[:, :-1] == trace[:, 1:]).all()


@pytest.mark.parametrize("name", ["trace.npy", "trace.jsonl"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    trace = synthetic_trace(20, num_layers=4, seed=0)
    write_trace(tmp_path / name, trace, 128)
    loaded, num_experts = read_trace(tmp_path / name)
    assert np.array_equal(loaded, trace) and loaded.dtype == np.int16
    assert num_experts == (128 if name.endswith(".jsonl") else None)


def test_jsonl_format_is_documented_shape(tmp_path: Path) -> None:
    write_trace(tmp_path / "t.jsonl", random_trace(2, 2, 8, 2, seed=0), 8)
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert lines[0] == {"format": "quire-routing", "version": 1, "num_layers": 2,
                        "num_experts": 8, "experts_per_token": 2}
    assert [(x["token"], x["layer"]) for x in lines[1:]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Order does not matter and the header is optional.
    (tmp_path / "shuffled.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:0:-1]))
    loaded, num_experts = read_trace(tmp_path / "shuffled.jsonl")
    assert num_experts is None and loaded.shape == (2, 2, 2)


@pytest.mark.parametrize(("text", "message"), [
    ("", "no routing records"),
    ("not json\n", "not a routing trace"),
    ('{"token": 0, "layer": 0, "experts": [1]}\n{"token": 0, "layer": 0, "experts": [2]}\n',
     "twice"),
    ('{"token": 0, "layer": 0, "experts": [1]}\n{"token": 1, "layer": 1, "experts": [2]}\n',
     "missing or malformed"),
])
def test_bad_trace_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_trace(path)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Cannot read"):
        read_trace(tmp_path / "absent.jsonl")

"""The command lines, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_json_is_greedy_and_reproducible(tiny_checkpoint):
    args = ["-m", "engine.cli", "--model", str(tiny_checkpoint), "--prompt", "Hello",
            "--greedy", "--max-tokens", "5", "--device", "cpu", "--json"]
    first, second = _run(*args), _run(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert set(out) >= {"prompt_ids", "output_ids", "text", "reasoning", "stats"}
    assert out["prompt_ids"][0] == 1 and len(out["output_ids"]) == 5
    assert json.loads(second.stdout)["output_ids"] == out["output_ids"]


def test_cli_bad_folder_prints_one_sentence(tmp_path):
    proc = _run("-m", "engine.cli", "--model", str(tmp_path), "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_tiny_writer_cli(tmp_path):
    out = tmp_path / "ckpt"
    proc = _run("-m", "engine.tiny", str(out), "--layers", "1", "--experts", "4", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1 and cfg["text_config"]["n_routed_experts"] == 4
    again = _run("-m", "engine.tiny", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_cli_doc_and_session_reuse_the_prefix_across_runs(tiny_checkpoint, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("The launch is on 4 May. The budget is 12,000 euros.\n" * 20)
    base = ["-m", "engine.cli", "--model", str(tiny_checkpoint), "--doc", str(doc), "--greedy",
            "--max-tokens", "3", "--device", "cpu", "--dtype", "float32", "--session", "notes",
            "--snapshot-dir", str(tmp_path / "snaps"), "--json"]
    first = _run(*base, "--prompt", "When is the launch?")
    assert first.returncode == 0, first.stderr
    out1 = json.loads(first.stdout)
    assert out1["stats"]["cached_prompt_tokens"] == 0
    assert list((tmp_path / "snaps").glob("*.safetensors"))
    second = _run(*base, "--prompt", "What is the budget?")
    out2 = json.loads(second.stdout)
    assert out2["stats"]["cached_prompt_tokens"] > 200

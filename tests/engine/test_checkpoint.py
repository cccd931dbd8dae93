"""The checkpoint reader: real layout accepted, every kind of broken folder gives one clear sentence."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.checkpoint import Checkpoint
from engine.errors import CheckpointError
from engine.model.names import expected_tensors


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A fresh copy of the tiny checkpoint to damage."""
    out = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, out)
    return out


def test_real_layout_loads_and_every_tensor_is_used(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert set(ckpt.tensors) == set(index["weight_map"]) == set(expected_tensors(ckpt.config))
    assert index["metadata"]["total_size"] == ckpt.total_bytes
    experts = ckpt.get("language_model.model.layers.0.mlp.experts.gate_up_proj")
    assert str(experts.dtype) == "torch.float8_e4m3fn"
    scale = ckpt.get("language_model.model.layers.0.mlp.experts.gate_up_proj_scale_inv")
    assert tuple(scale.shape) == (8, 1, 1) and len(set(scale.flatten().tolist())) > 1


def _message(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(folder)
    return info.value.user_message


def test_missing_folder(tmp_path):
    assert "does not exist" in _message(tmp_path / "nope")


def test_a_file_instead_of_a_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert "is a file, not a folder" in _message(f)


def test_wrong_folder_without_config(tmp_path):
    assert "no config.json" in _message(tmp_path)


def test_folder_one_level_too_high_names_the_right_one(broken):
    msg = _message(broken.parent)
    assert "no config.json" in msg and str(broken) in msg


def test_unknown_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "LlamaForCausalLM" in _message(broken)


def test_corrupt_config(broken):
    (broken / "config.json").write_text("{not json")
    assert "config.json" in _message(broken) and "cannot be read" in _message(broken)


def test_missing_shard(broken):
    (broken / "model-00002-of-00002.safetensors").unlink()
    msg = _message(broken)
    assert "missing 1 of 2 weight files" in msg and "model-00002-of-00002" in msg


def test_truncated_shard(broken):
    shard = broken / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    msg = _message(broken)
    assert "truncated" in msg and "1,000 bytes missing" in msg


def test_garbage_shard(broken):
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"\xff" * 64)
    assert "not a readable safetensors file" in _message(broken)


def test_config_that_does_not_match_the_tensors(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 128
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "does not match the weights" in _message(broken)


def test_config_with_more_layers_than_the_tensors(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    assert "lacks" in _message(broken)


def test_renamed_tensor_is_named(broken):
    from safetensors.torch import load_file, save_file

    shard = broken / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name + "_renamed"] = tensors.pop(name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert name in _message(broken)

"""Mistral's native NVFP4 release folder (params.json, consolidated shards, tekken.json): opened
under the engine's names, every path against transformers on the same weights, its errors.

The oracle (tests.helpers.oracle.native_reference_model) decodes NVFP4 and renames the tensors
on its own, after transformers' conversion table, with transformers' own rotary permutation for
the vision tower; its config is the HF release's config.json for the same tiny shape.
Tolerance: fp32 logits within 1e-4 absolute (measured ~3e-6: summation order only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import api
from engine.api import SamplingParams
from engine.checkpoint import Checkpoint
from engine.errors import CheckpointError, InputError, OutOfMemoryError
from engine.experts import nvfp4, nvfp4_cpu
from engine.experts.pinned import is_page_locked
from engine.experts.store import HostExpertStore, host_format_for
from engine.generate import Generator
from engine.planning import plan_in_format, shape_of
from engine.runtime import LoadedModel, LoadOptions
from engine.tiny import TinyShape
from engine.tiny_native import write_tiny_nvfp4_checkpoint
from tests.helpers.assert_close import assert_close
from tests.helpers.oracle import native_reference_model
from tests.helpers.prefill_decode import prefill_then_decode

FP32_ATOL = 1e-4
PROMPT_IDS = [1, 306, 4658, 278, 6593, 310, 2834, 338, 1000, 2000, 3000, 4000, 5000, 77, 99, 123]
SHAPE = TinyShape()


@pytest.fixture(scope="module")
def nvfp4_folder(tmp_path_factory, tokenizer_dir) -> Path:
    return write_tiny_nvfp4_checkpoint(tmp_path_factory.mktemp("nvfp4"), SHAPE, tokenizer_from=tokenizer_dir)


@pytest.fixture(scope="module")
def reference(nvfp4_folder):
    return native_reference_model(nvfp4_folder, SHAPE)


def _ours(folder: Path, **kw) -> LoadedModel:
    return LoadedModel(folder, LoadOptions(device="cpu", dtype="float32", **kw))


def test_the_folder_opens_under_the_engine_names(nvfp4_folder):
    ckpt = Checkpoint.open(nvfp4_folder)
    cfg = ckpt.config
    assert (cfg.expert_format, cfg.is_fp8, cfg.num_hidden_layers, cfg.n_routed_experts) == ("nvfp4", False, 2, 8)
    assert cfg.rope_mscale_all_dim == 1.0  # the FP8 release's YaRN reading (see checkpoint_native)
    assert cfg.vision and cfg.image_token_id == 10
    gate_up = ckpt.get("language_model.model.layers.1.mlp.experts.gate_up_proj")
    assert gate_up.shape == (8, 64, 64)
    # The derived fused experts are the shipped NVFP4 values, w1's rows then w3's.
    w3 = nvfp4.dequantize_shipped(*(ckpt.get(f"layers.1.experts.5.w3.{p}") for p in
                                    ("weight_packed", "weight_scale", "weight_global_scale")))
    assert torch.equal(gate_up[5, 32:], w3)
    files = sum(f.stat().st_size for f in nvfp4_folder.glob("consolidated-*.safetensors"))
    assert 0.99 * files < ckpt.total_bytes <= files  # headers aside, each stored tensor once


@pytest.mark.parametrize("options", [
    {}, {"expert_cache_slots": 0}, {"expert_cache_slots": 2}, {"expert_cache_slots": 2, "num_targets": 2},
    {"expert_cache_slots": 3, "prefetch": True},
], ids=["resident", "all-offloaded", "2-slots", "two-targets", "prefetch"])
def test_prefill_logits_match_transformers(nvfp4_folder, reference, options):
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT_IDS])).logits[0]
    model = _ours(nvfp4_folder, **options)
    ours = model.forward(model.embed_ids(PROMPT_IDS), model.decoder.new_cache(), logits_for="all")
    assert_close(f"nvfp4 {options}", ours, expected, FP32_ATOL)
    if options:
        assert model.decoder.experts.store.fmt == "nvfp4"


@pytest.mark.skipif(not nvfp4_cpu.available(), reason="no C compiler: PyTorch serves NVFP4 on the CPU")
def test_cpu_misses_go_through_the_cpu_kernel_and_match_transformers(nvfp4_folder, reference, monkeypatch):
    """Every expert a miss: the prompt's and a decode step's experts are computed by the NVFP4 CPU
    kernel's products (fp32, from the blobs), within the fp32 tolerance of transformers."""
    calls: list[int] = []
    real_matmul = nvfp4_cpu.Kernel.matmul
    monkeypatch.setattr(nvfp4_cpu.Kernel, "matmul",
                        lambda self, x, *a: (calls.append(len(x)), real_matmul(self, x, *a))[1])
    model = _ours(nvfp4_folder, expert_cache_slots=0)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([PROMPT_IDS])).logits[0]
    ours = prefill_then_decode(model, PROMPT_IDS, prefill=len(PROMPT_IDS) - 1)
    assert_close("nvfp4 through the CPU kernel", ours, expected, FP32_ATOL)
    assert calls and 1 in calls  # the decode step's experts too


def test_chunked_greedy_decode_through_the_cache_matches_transformers(nvfp4_folder, reference):
    model = _ours(nvfp4_folder, expert_cache_slots=2)
    prompt = model.formatter.build([api.ChatMessage("user", "Summarise the report.")], "Be brief.", "none")
    result = Generator(model, prompt, SamplingParams(temperature=0.0, max_tokens=12),
                       model.decoder.new_cache(), prefill_chunk=7).run()
    ids = prompt.ids + result.output_ids
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    picks = expected[len(prompt.ids) - 1: -1].argmax(-1).tolist()
    assert result.output_ids[: len(picks)] == picks


def test_image_prompt_matches_transformers(nvfp4_folder, reference, tmp_path):
    """The vision tower's rotary projections are reordered from Mistral's interleaved pairs."""
    from PIL import Image

    img = tmp_path / "photo.png"
    Image.effect_mandelbrot((90, 60), (-2.0, -1.2, 1.0, 1.2), 64).convert("RGB").save(img)
    model = _ours(nvfp4_folder)
    prompt = model.formatter.build([api.ChatMessage("user", "What is this?", images=(img,))], "", "none")
    ours = model.forward(model.embed_prompt(prompt, 0), model.decoder.new_cache(), logits_for="all")
    pixels = torch.from_numpy(prompt.images[0].pixels)[None]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt.ids]), pixel_values=pixels,
                             image_sizes=torch.tensor([pixels.shape[2:]])).logits[0]
    assert_close("nvfp4 image prompt", ours, expected, FP32_ATOL)


def test_tekken_only_tokenizer_renders_as_the_release_files(nvfp4_folder, tiny_checkpoint):
    """tekken.json alone (the NVFP4 release) gives the prompts of the HF release's tokenizer files."""
    from engine.chat import ChatFormatter

    messages = [api.ChatMessage("user", "Hello there, how are you?"), api.ChatMessage("assistant", "Fine."),
                api.ChatMessage("user", "Explain MoE offloading in two lines.")]
    for effort in ("none", "high"):
        native = ChatFormatter(nvfp4_folder).build(messages, "Be brief.", effort).ids
        assert native == ChatFormatter(tiny_checkpoint).build(messages, "Be brief.", effort).ids
    assert ChatFormatter(nvfp4_folder).decode([1, 22177, 2]) == ChatFormatter(tiny_checkpoint).decode([1, 22177, 2])


def test_host_format_is_the_shipped_one(nvfp4_folder, tiny_checkpoint):
    ckpt = Checkpoint.open(nvfp4_folder)
    assert {host_format_for(ckpt.config, f) for f in ("auto", "fp8", "int8", "int4")} == {"nvfp4"}
    with pytest.raises(InputError, match="NVFP4 release"):
        host_format_for(Checkpoint.open(tiny_checkpoint).config, "nvfp4")
    store = HostExpertStore(ckpt, "mmap", "int8")  # blobs are built in RAM, never mapped
    layer = store.layers[0]
    assert (store.fmt, store.mode, layer.gate_up.dtype) == ("nvfp4", "ram", nvfp4.BLOB_DTYPE)
    assert layer.gate_up.shape == (8, 64, nvfp4.blob_width(64)) and layer.down_scale.shape == (8, 64)
    shape = shape_of(ckpt, "nvfp4")
    assert shape.expert_bytes == layer.expert_bytes()  # what a slot holds and a miss moves
    # Every expert's divisors, as the store holds them: on the GPU beside the slots (planned with
    # the dense part) and in RAM with the experts.
    tables = (layer.gate_up_scale.numel() + layer.down_scale.numel()) * layer.down_scale.element_size()
    assert shape.dense_bytes_per_layer - shape_of(ckpt, "fp8").dense_bytes_per_layer == tables
    assert shape.host_expert_bytes == 2 * (8 * layer.expert_bytes() + tables)


def test_a_machine_short_of_ram_gets_a_clear_error(nvfp4_folder):
    ckpt = Checkpoint.open(nvfp4_folder)
    from engine.placement import plan_placement

    def plan_for(fmt):
        return plan_placement(shape_of(ckpt, fmt), [], host_available_bytes=1000, host_total_bytes=2000,
                              context_length=4096, targets=["cpu"])

    assert plan_for("nvfp4").host_store == "mmap"  # what the planner does for other formats
    with pytest.raises(OutOfMemoryError, match=r"NVFP4 experts \(.*\) need about .* free RAM.*FP8 release"):
        plan_in_format("nvfp4", plan_for)


def test_a_cpu_machine_short_of_ram_gets_the_same_error(nvfp4_folder, monkeypatch):
    """Without a GPU the RAM decision is made apart from the plan: the same refusal, not a
    load that builds 65 GB of blobs in too little memory."""
    from engine import planning

    monkeypatch.setattr(planning, "detect_host_memory", lambda: (2000, 1000))
    with pytest.raises(OutOfMemoryError, match=r"NVFP4 experts \(.*\) need about"):
        planning.planned_options(LoadOptions(device="cpu"), Checkpoint.open(nvfp4_folder))


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_broken_folders_say_what_is_wrong(nvfp4_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(nvfp4_folder, tmp_path)
    shard = folder / "consolidated-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("weight_scale"))
    save_file({**tensors, name: tensors[name].view(torch.uint8)}, str(shard))
    with pytest.raises(CheckpointError, match=f"{name} is U8.*params.json implies F8_E4M3"):
        Checkpoint.open(folder)
    # Mistral's native copy of the FP8 release (qscale tensors, no NVFP4 parts): refused with
    # the way out, not as an incomplete download.
    fp8_copy = {n: t for n, t in tensors.items() if not n.endswith("weight_packed")}
    save_file({**fp8_copy, "layers.0.attention.wo.qscale_weight": torch.ones(1)}, str(shard))
    index = json.loads((folder / "consolidated.safetensors.index.json").read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.endswith("weight_packed")}
    index["weight_map"]["layers.0.attention.wo.qscale_weight"] = shard.name
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="native copy of the FP8 release.*config.json"):
        Checkpoint.open(folder)
    params = json.loads((folder / "params.json").read_text())  # said by params.json alone too
    (folder / "params.json").write_text(json.dumps(params | {"quantization": {"qformat_weight": "fp8_e4m3"}}))
    save_file(fp8_copy, str(shard))
    del index["weight_map"]["layers.0.attention.wo.qscale_weight"]
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="native copy of the FP8 release"):
        Checkpoint.open(folder)
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "params.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="params.json .* cannot be read"):
        Checkpoint.open(folder)
    params = json.loads((nvfp4_folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "moe": {**params["moe"], "first_k_dense_replace": 1}}))
    with pytest.raises(CheckpointError, match="dense layers"):
        Checkpoint.open(folder)
    for key, edit, message in (
            ("yarn", None, "invalid value for 'yarn'"),
            ("llama_4_scaling", None, "Llama-4 query scaling"),  # another model
            ("yarn", {**params["yarn"], "apply_scale": True}, "YaRN magnitude scaling"),
            ("moe", [], "invalid value for"),  # not an object
    ):
        changed = {k: v for k, v in params.items() if k != key} | ({key: edit} if edit is not None else {})
        (folder / "params.json").write_text(json.dumps(changed))
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(folder)


def test_a_missing_expert_tensor_is_named(nvfp4_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(nvfp4_folder, tmp_path)
    shard = folder / "consolidated-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    gone = next(n for n in tensors if ".experts." in n and n.endswith("weight_packed"))
    del tensors[gone]
    save_file(tensors, str(shard))
    index = json.loads((folder / "consolidated.safetensors.index.json").read_text())
    del index["weight_map"][gone]
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lacks 1 tensor.*{gone}"):
        Checkpoint.open(folder)


def test_a_text_only_params_json_loads_without_vision(nvfp4_folder, tmp_path):
    """A params.json without vision_encoder describes a text model; the folder's vision tensors
    are then not part of it (an error naming one), as for config.json folders."""
    folder = _copy(nvfp4_folder, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    del params["vision_encoder"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="does not describe, e.g. (vision_encoder|patch_merger|pre_mm)"):
        Checkpoint.open(folder)


LONG_IDS = PROMPT_IDS * 5  # 80 tokens: a 70-token prefill streams the experts (engine.experts.streaming)


@pytest.fixture(scope="module")
def long_expected(reference):
    with torch.no_grad():
        return reference(input_ids=torch.tensor([LONG_IDS])).logits[0]


@pytest.mark.parametrize(("slots", "targets"), [(0, 1), (2, 1), (2, 2)])
def test_streamed_prefill_then_decode_matches_transformers(nvfp4_folder, long_expected, slots, targets):
    model = _ours(nvfp4_folder, expert_cache_slots=slots, num_targets=targets)
    logits = prefill_then_decode(model, LONG_IDS, prefill=70)
    assert_close(f"nvfp4 streamed slots={slots} targets={targets}", logits, long_expected, FP32_ATOL)
    assert model.experts.counters()["hits"] + model.experts.counters()["misses"] > 0


def test_slots_hand_nvfp4_blobs_and_divisors_to_its_kernels(nvfp4_folder, monkeypatch,
                                                           dequantised_cpu_misses):
    """Cached NVFP4 experts go to engine.experts.nvfp4_kernel (here replaced by the eager
    reference, which the kernel tests hold the kernels to): one grouped call per decode step
    with the layer's divisor tables read at the experts' ids, and the single-expert form."""
    from engine.experts import nvfp4_kernel
    from engine.experts.compute import dequant_expert, expert_forward

    calls = {"grouped": 0, "single": 0}

    def eager_grouped(x, gate_up_slots, down_slots, slot_ids, gate_up_div, down_div, expert_ids):
        calls["grouped"] += 1
        return torch.stack([expert_forward(x, *dequant_expert(
            gate_up_slots[s], gate_up_div[e], down_slots[s], down_div[e], torch.bfloat16))
            for s, e in zip(slot_ids.tolist(), expert_ids.tolist(), strict=True)])

    def eager_single(x, gate_up, gate_up_div, down, down_div):
        calls["single"] += 1
        return expert_forward(x, *dequant_expert(gate_up, gate_up_div, down, down_div, torch.bfloat16))

    monkeypatch.setattr(nvfp4_kernel, "grouped_nvfp4_expert_forward", eager_grouped)
    monkeypatch.setattr(nvfp4_kernel, "nvfp4_expert_forward", eager_single)
    resident = LoadedModel(nvfp4_folder, LoadOptions(dtype="bfloat16"))
    expected = prefill_then_decode(resident, LONG_IDS, prefill=70)
    for grouped in (True, False):
        offloaded = LoadedModel(nvfp4_folder, LoadOptions(dtype="bfloat16", expert_cache_slots=3))
        for slots in offloaded.experts.layers:
            assert slots.nvfp4
            slots.use_kernel, slots.use_grouped = True, grouped
        assert torch.equal(prefill_then_decode(offloaded, LONG_IDS, prefill=70), expected)
        offloaded.close()
    assert calls["grouped"] and calls["single"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_nvfp4_offload_matches_transformers(nvfp4_folder, long_expected, monkeypatch):
    """fp32 on the GPU (TF32 off): blobs page-locked, copied to slots and staging buffers,
    dequantised by the GPU's paths; 1e-3 absolute (cuBLAS reduction order, as test_cuda.py)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = LoadedModel(nvfp4_folder, LoadOptions(device="cuda", dtype="float32", expert_cache_slots=2))
    assert is_page_locked(model.experts.store.layers[0].gate_up)
    logits = prefill_then_decode(model, LONG_IDS, prefill=70).cpu()
    assert_close("cuda nvfp4 fp32", logits, long_expected, 1e-3)
    model.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_nvfp4_decode_runs_the_kernels(nvfp4_folder, long_expected):
    """The path a GPU runs the NVFP4 release on: bf16, the grouped NVFP4 kernel, prefetch, the
    dequantisation kernel for streamed prefill; within bf16 parity of the reference (0.25 max,
    0.03 mean, as tests/engine/test_cuda.py)."""
    model = LoadedModel(nvfp4_folder, LoadOptions(device="cuda", dtype="bfloat16", expert_cache_slots=2,
                                                  prefetch=True))
    assert all(s.nvfp4 and s.use_grouped for s in model.experts.layers), "kernel disabled"
    logits = prefill_then_decode(model, LONG_IDS, prefill=70).cpu().float()
    assert_close("cuda bf16 nvfp4", logits, long_expected, 0.25, mean_atol=0.03)
    assert model.experts.counters()["hits"] > 0
    model.close()


def test_a_config_json_naming_compressed_tensors_beside_params_json_is_read_natively(nvfp4_folder, tmp_path):
    folder = _copy(nvfp4_folder, tmp_path)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    assert Checkpoint.open(folder).config.expert_format == "nvfp4"


def test_bf16_shared_experts_are_accepted(nvfp4_folder, tmp_path):
    """A variant with BF16 shared experts (`.weight`) reads them as they are."""
    from safetensors.torch import load_file, save_file

    folder = _copy(nvfp4_folder, tmp_path)
    index_path = folder / "consolidated.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"]["layers.1.shared_experts.w1.weight_packed"]
    tensors = load_file(str(shard))
    bf16 = {}
    for w in ("w1", "w2", "w3"):
        prefix = f"layers.1.shared_experts.{w}"
        parts = [tensors.pop(f"{prefix}.{p}") for p in ("weight_packed", "weight_scale", "weight_global_scale")]
        tensors.pop(f"{prefix}.input_global_scale")
        bf16[f"{prefix}.weight"] = nvfp4.dequantize_shipped(*parts).to(torch.bfloat16)
    save_file(tensors | bf16, str(shard))
    index["weight_map"] = {n: f for n, f in index["weight_map"].items()
                           if not n.startswith("layers.1.shared_experts.")} | {n: shard.name for n in bf16}
    index_path.write_text(json.dumps(index))
    ckpt = Checkpoint.open(folder)
    assert torch.equal(ckpt.get("language_model.model.layers.1.mlp.shared_experts.down_proj.weight"),
                       bf16["layers.1.shared_experts.w2.weight"])


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_cached_experts_through_the_interpreted_nvfp4_kernels(nvfp4_folder, monkeypatch,
                                                            dequantised_cpu_misses):
    """The slots' real calls into the NVFP4 kernels (run by Triton's interpreter on the CPU):
    the decode tokens' logits close to the resident engine's on the same weights. Mean within
    bf16 parity (0.03, as tests/engine/test_cuda.py); the max is looser (1.0, measured 0.78)
    because Triton 3.9's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest
    (3.1552 becomes 3.1406, not 3.1562), and this kernel rounds four times per expert. A
    mis-wired call (another expert's divisors or slot) is off by whole factors."""
    from engine.experts import slots as slots_module
    from tests.helpers.triton_interpreter import interpreted_copy

    kernels = interpreted_copy(slots_module.nvfp4_kernel)
    monkeypatch.setattr(slots_module, "nvfp4_kernel", kernels)
    expected = prefill_then_decode(LoadedModel(nvfp4_folder, LoadOptions(dtype="bfloat16")), LONG_IDS, 70)
    for grouped in (True, False):
        model = LoadedModel(nvfp4_folder, LoadOptions(dtype="bfloat16", expert_cache_slots=3))
        for layer_slots in model.experts.layers:
            layer_slots.use_kernel, layer_slots.use_grouped = True, grouped
        logits = prefill_then_decode(model, LONG_IDS, prefill=70)
        assert_close(f"interpreted nvfp4 kernels, grouped={grouped}", logits[70:].float(),
                     expected[70:].float(), 1.0, mean_atol=0.03)
        assert model.experts.counters()["hits"] > 0
        model.close()


def test_a_cpu_plan_warns_only_where_the_experts_stay_nvfp4_without_the_cpu_kernel(
        nvfp4_folder, monkeypatch):
    """Without a GPU, NVFP4 experts computed from the host store are slow when Quire's CPU
    kernel could not be built (no C compiler): the plan says so, unless RAM keeps them all
    dequantised (then they are as fast as any)."""
    from engine import planning
    from engine.experts import nvfp4_cpu

    def summary(resident: bool, kernel: bool = False) -> str:
        monkeypatch.setattr(planning, "cpu_keeps_experts_resident", lambda ckpt, available: resident)
        monkeypatch.setattr(nvfp4_cpu, "available", lambda: kernel)
        return planning.plan_for_folder(api.PlanModel("p", nvfp4_folder, "cpu", context_length=4096)).summary

    assert planning.NVFP4_ON_CPU not in summary(True)
    assert planning.NVFP4_ON_CPU not in summary(False, kernel=True)
    warned = summary(False)
    assert warned.endswith(f"RAM. {planning.NVFP4_ON_CPU}."), warned

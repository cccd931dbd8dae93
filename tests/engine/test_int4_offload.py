"""The opt-in int4 host format (engine/experts/int4.py) through the whole offload runtime.

int4 is lossy, so its parity reference is exact in another way: the resident engine with every
expert replaced by its int4 blob dequantised (what the format means). Every offload path (tiny
cache, CPU-served misses through PyTorch's int4 kernel, streamed prefill, two targets) must give
that reference's logits within 1e-3 absolute in fp32: the CPU kernel reorders the fp32 sums
(observed ~1e-5 per matmul). Against the FP8 reference the format is only required to stay
close, at tolerances measured on this tiny model and stated in the test.
"""

from __future__ import annotations

import pytest
import torch

from engine.experts import int4
from engine.experts.pinned import is_page_locked
from engine.runtime import LoadedModel, LoadOptions
from tests.helpers.assert_close import assert_close
from tests.helpers.oracle import reference_model
from tests.helpers.prefill_decode import prefill_then_decode

INT4_ATOL = 1e-3
IDS = [1, 306, 4658, 278, 6593, 310, 2834, 338, 1000, 2000] * 8  # 80 tokens: one streamed chunk


@pytest.fixture(scope="module")
def int4_checkpoint(make_tiny):
    """The tiny model with expert widths the int4 layout takes (multiples of 64)."""
    return make_tiny(moe_intermediate=64)


def _run(model: LoadedModel, prefill: int) -> torch.Tensor:
    return prefill_then_decode(model, IDS, prefill)


def _int4_model(ckpt, slots: int, **opts) -> LoadedModel:
    return LoadedModel(ckpt, LoadOptions(dtype="float32", expert_cache_slots=slots, host_format="int4",
                                         **opts))


def _dequantised_logits(ckpt, store, device: str = "cpu", dtype: str = "float32") -> torch.Tensor:
    """Logits of the resident engine whose experts are `store`'s int4 blobs dequantised."""
    resident = LoadedModel(ckpt, LoadOptions(device=device, dtype=dtype))
    for layer, host in enumerate(store.layers):
        resident.experts.weights[layer] = tuple(
            torch.stack([int4.dequantize(blob, getattr(torch, dtype)) for blob in blobs]).to(device)
            for blobs in (host.gate_up, host.down))
    logits = _run(resident, prefill=len(IDS)).cpu()
    resident.close()
    return logits


@pytest.fixture(scope="module")
def dequantised_reference(int4_checkpoint):
    store_model = _int4_model(int4_checkpoint, 0)
    logits = _dequantised_logits(int4_checkpoint, store_model.experts.store)
    store_model.close()
    return logits


@pytest.mark.parametrize("slots", [0, 2])
@pytest.mark.parametrize("cpu_misses", [True, False], ids=["cpu-misses", "copies-only"])
@pytest.mark.parametrize("targets", [1, 2], ids=["one-target", "two-targets"])
def test_every_offload_path_gives_the_dequantised_logits(int4_checkpoint, dequantised_reference, slots,
                                                         cpu_misses, targets):
    model = _int4_model(int4_checkpoint, slots, num_targets=targets)
    model.experts.cpu_misses = cpu_misses
    store = model.experts.store
    assert store.fmt == "int4" and store.layers[0].gate_up.dtype == torch.uint8
    logits = _run(model, prefill=70)  # a streamed chunk, then decode steps
    assert_close(f"int4 slots={slots} cpu={cpu_misses} targets={targets}", logits,
                 dequantised_reference, INT4_ATOL)
    counters = model.experts.counters()
    assert (counters["cpu_experts"] > 0) == cpu_misses
    model.close()


def test_int4_stays_close_to_the_fp8_reference(int4_checkpoint):
    """Measured on this tiny model: mean |logit diff| 0.071 and 84% of positions keep the
    reference's top token (int8: 0.009 and 97%). Random weights are the worst case for 4-bit
    rounding (no outliers to spare, every weight equally important)."""
    ref = reference_model(int4_checkpoint, torch.float32)
    with torch.no_grad():
        reference = ref(input_ids=torch.tensor([IDS])).logits[0]
    model = _int4_model(int4_checkpoint, 2)
    logits = _run(model, prefill=70)
    model.close()
    mean_diff = float((logits - reference).abs().mean())
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    print(f"int4 vs fp8: mean |diff| {mean_diff:.4f}, top-1 agreement {agreement:.3f}")
    assert mean_diff < 0.1
    assert agreement >= 0.7


def test_an_int4_expert_is_0_56_of_an_fp8_one_and_plans_more_slots(int4_checkpoint):
    from engine.checkpoint import Checkpoint
    from engine.planning import shape_of

    ckpt = Checkpoint.open(int4_checkpoint)
    fp8, packed = shape_of(ckpt, "fp8"), shape_of(ckpt, "int4")
    assert packed.expert_bytes == pytest.approx(0.5625 * fp8.expert_bytes)
    assert packed.host_expert_bytes == pytest.approx(0.5625 * fp8.host_expert_bytes)
    model = _int4_model(int4_checkpoint, 1)
    assert model.experts.store.layers[0].expert_bytes() == packed.expert_bytes
    model.close()


def test_a_model_whose_widths_int4_cannot_take_says_so(tiny_checkpoint):
    """The default tiny model's experts are 32 wide, not a multiple of the 64-input groups."""
    from engine.checkpoint import Checkpoint
    from engine.errors import InputError
    from engine.planning import shape_of

    with pytest.raises(InputError, match="Choose 8-bit experts"):
        shape_of(Checkpoint.open(tiny_checkpoint), "int4")


@pytest.mark.parametrize("ram_short", [False, True])
def test_the_plan_falls_back_to_8_bit_when_ram_is_short(int4_checkpoint, monkeypatch, ram_short):
    """int4 is a requantised copy in RAM; with RAM short the store serves FP8 from the mapped
    files, so the plan (the app's preview and the load's slots) must be made for FP8's bytes."""
    from engine import api, planning
    from engine.checkpoint import Checkpoint
    from engine.placement import HOST_SAFETY_BYTES, GpuInfo, _host_fixed_bytes
    from engine.runtime import LoadOptions

    ckpt = Checkpoint.open(int4_checkpoint)
    shape = planning.shape_of(ckpt, "int4")
    # Short: room for the host's own parts (embeddings, vision) but not for the pinned experts.
    available = _host_fixed_bytes(shape) + HOST_SAFETY_BYTES + shape.host_expert_bytes // 2 \
        if ram_short else 200 * 10**9
    monkeypatch.setattr(planning, "detect_gpus", lambda *indices: [GpuInfo(0, "H100", 85 * 10**9, 84 * 10**9)])
    monkeypatch.setattr(planning, "detect_host_memory", lambda: (256 * 10**9, available))
    ready = planning.plan_for_folder(api.PlanModel("p", int4_checkpoint, "cuda", host_format="int4"))
    opts = planning.planned_options(LoadOptions(device="cuda", host_format="int4"), ckpt)
    expected = planning.shape_of(ckpt, "fp8" if ram_short else "int4").host_expert_bytes
    experts_part = [p.num_bytes for p in ready.parts if p.what.startswith("routed experts")]
    assert experts_part == [expected]
    assert ready.summary.startswith(planning.INT4_NEEDS_RAM) == ram_short
    assert opts.host_format == ("fp8" if ram_short else "int4")
    assert opts.host_mode == ("mmap" if ram_short else "pinned")


def test_the_app_is_told_a_load_holds_4_bit_experts(int4_checkpoint):
    """Through the engine service, as the app loads: the request's format reaches the store and
    the loaded-model summary the app shows names it."""
    from engine import api
    from engine.service import EngineService
    from tests.engine.test_service import Collector

    sink = Collector()
    svc = EngineService(sink)
    svc.start()
    try:
        svc.submit(api.LoadModel("load", int4_checkpoint, device="cpu", expert_cache_slots=1,
                                 host_format="int4"))
        events = sink.until_finished("load")
    finally:
        svc.close()
    loaded = next(e for e in events if isinstance(e, api.ModelLoaded))
    assert "1 expert slots per layer, the rest offloaded (4-bit experts)" in loaded.device_summary
    stages = [e.stage for e in events if isinstance(e, api.LoadProgress)]
    assert stages[0] == "preparing 4-bit experts" and stages[-1] == "reading weights", stages


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("slots", [0, 2])
@pytest.mark.parametrize("targets", [1, 2])
def test_cuda_int4_offload_gives_its_dequantised_logits(int4_checkpoint, slots, targets, monkeypatch):
    """fp32 on the GPU (TF32 off): experts requantised on the GPU at load, page-locked in place,
    copied to slots and staging buffers, CPU misses beside; against the resident engine with the
    same blobs dequantised, 1e-3 absolute (cuBLAS reduction order, as tests/engine/test_cuda.py)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _int4_model(int4_checkpoint, slots, device="cuda", num_targets=targets)
    store = model.experts.store
    assert store.quantize_device.type == "cuda" and is_page_locked(store.layers[0].gate_up)
    logits = _run(model, prefill=70).cpu()
    assert_close(f"cuda int4 slots={slots} targets={targets}", logits,
                 _dequantised_logits(int4_checkpoint, store), INT4_ATOL)
    model.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_int4_decode_runs_the_kernels(int4_checkpoint, monkeypatch):
    """The path a 24 GB card runs with 4-bit experts: bf16, the int4 grouped kernel, prefetch,
    the combine kernel; as close to the resident GPU engine on the same blobs as bf16 parity
    allows (0.25 max, 0.03 mean, as tests/engine/test_cuda.py)."""
    from engine.experts import offload

    combined = []
    combine = offload.combine
    monkeypatch.setattr(offload, "combine", lambda *a: combined.append(1) or combine(*a))
    model = LoadedModel(int4_checkpoint, LoadOptions(device="cuda", dtype="bfloat16", expert_cache_slots=2,
                                                     host_format="int4", prefetch=True))
    assert all(slots.int4 and slots.use_grouped for slots in model.experts.layers), "kernel disabled"
    logits = _run(model, prefill=70).cpu().float()
    expected = _dequantised_logits(int4_checkpoint, model.experts.store, "cuda", "bfloat16").float()
    assert_close("cuda bf16 int4 offload", logits, expected, 0.25, mean_atol=0.03)
    assert combined and model.experts.counters()["hits"] > 0
    model.close()


def test_the_plan_says_what_the_other_precision_would_cache(int4_checkpoint, tiny_checkpoint,
                                                            monkeypatch):
    """The app's preview helps choose: with 8-bit chosen it says what 4-bit would cache, and the
    other way round; nothing where the choice does not apply (no GPU, widths int4 cannot take)."""
    from engine import api, planning
    from engine.placement import GpuInfo

    gpu = GpuInfo(0, "H100", 85 * 10**9, 84 * 10**9)
    monkeypatch.setattr(planning, "detect_host_memory", lambda: (256 * 10**9, 200 * 10**9))
    monkeypatch.setattr(planning, "detect_gpus", lambda *indices: [gpu])

    from engine.checkpoint import Checkpoint

    # A budget with room for 6 FP8 experts beside the dense part, KV and workspace: the two
    # precisions then cache different numbers of the 16.
    (target,) = planning.make_plan(Checkpoint.open(int4_checkpoint), "cuda", None, 32768).targets
    budget = target.dense_bytes + target.kv_bytes + target.workspace_bytes + 6 * 3 * 64 * 64

    def ready(folder, host_format):
        return planning.plan_for_folder(api.PlanModel("p", folder, "cuda", gpu_budget_bytes=budget,
                                                      host_format=host_format))

    eight, four = ready(int4_checkpoint, "auto"), ready(int4_checkpoint, "int4")
    slots = [int(p.what.split("(")[1].split()[0].replace(",", "")) for r in (eight, four)
             for p in r.parts if p.what.startswith("expert cache")]
    assert slots[0] < slots[1]
    assert eight.alternative == (f"With 4-bit experts (faster, less exact): {slots[1]:,} of 16 "
                                 f"experts cached on the GPU, against {slots[0]:,} now.")
    assert four.alternative.startswith(f"With 8-bit experts (more exact): {slots[0]:,} of 16 experts")
    assert ready(tiny_checkpoint, "auto").alternative == ""  # 32-wide experts
    everything = planning.plan_for_folder(api.PlanModel("p", int4_checkpoint, "cuda", host_format="auto"))
    assert "16 of 16" in everything.summary and everything.alternative == ""  # nothing to gain
    monkeypatch.setattr(planning, "detect_gpus", lambda *indices: [])
    assert ready(int4_checkpoint, "auto").alternative == ""  # a CPU plan


def test_a_cpu_machine_holds_int4_experts_in_ram_where_fp8_would_be_mapped(int4_checkpoint,
                                                                           monkeypatch):
    """No GPU and RAM for int4's copy but not for FP8's: 4-bit experts stay in RAM (fast) where
    8-bit ones are served from the mapped files (disk speed)."""
    from engine import planning
    from engine.checkpoint import Checkpoint
    from engine.runtime import LoadOptions

    ckpt = Checkpoint.open(int4_checkpoint)
    fp8_bytes = planning.shape_of(ckpt, "fp8").host_expert_bytes
    available = int(fp8_bytes / 0.9 * 0.8)  # FP8 needs 0.9 of RAM free; int4's 0.56x fits
    monkeypatch.setattr(planning, "detect_host_memory", lambda: (2 * available, available))
    modes = {fmt: planning.planned_options(LoadOptions(device="cpu", host_format=fmt), ckpt)
             for fmt in ("auto", "int4")}
    assert modes["auto"].host_mode == "mmap" and modes["auto"].host_format == "fp8"
    assert modes["int4"].host_mode == "ram" and modes["int4"].host_format == "int4"
    assert modes["int4"].expert_cache_slots == 0


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_gpu_that_fails_to_requantise_hands_the_load_to_the_cpu(int4_checkpoint, monkeypatch,
                                                                    caplog, fmt):
    """Out of memory (or a driver problem) on the GPU while requantising costs speed, not the
    load: that layer and every later one are requantised on the CPU, to the same bits."""
    import logging

    from engine.checkpoint import Checkpoint
    from engine.experts import store as store_module

    real = {"int8": store_module.requantize_int8, "int4": store_module.requantize_int4}[fmt]
    calls = []

    def flaky(*args):
        calls.append(args[-1])
        if args[-1] is not None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(store_module, f"requantize_{fmt}", flaky)
    ckpt = Checkpoint.open(int4_checkpoint)
    with caplog.at_level(logging.WARNING):
        store = store_module.HostExpertStore(ckpt, "ram", fmt, quantize_device=torch.device("cuda", 0))
    assert "the CPU does it instead" in caplog.text and store.quantize_device is None
    assert calls[:2] == [torch.device("cuda", 0), None] and all(c is None for c in calls[2:])
    reference = store_module.HostExpertStore(ckpt, "ram", fmt)
    for ours, theirs in zip(store.layers, reference.layers, strict=True):
        assert torch.equal(ours.gate_up, theirs.gate_up) and torch.equal(ours.down, theirs.down)
        assert torch.equal(ours.gate_up_scale, theirs.gate_up_scale)

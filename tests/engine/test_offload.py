"""Every offload path (tiny cache, CPU-served misses, staging copies, streamed prefill chunks,
two-target layer split, mmap host store) gives the reference's logits and greedy tokens.

Tolerance: fp32, 1e-4 absolute on logits (as tests/engine/test_parity.py).
"""

from __future__ import annotations

import pytest
import torch

from engine import api
from engine.experts import fp8_cpu
from engine.experts.offload import STREAM_MIN_TOKENS
from engine.experts.profile import MachineProfile
from engine.generate import Generator
from engine.runtime import LoadedModel, LoadOptions
from tests.helpers.assert_close import assert_close
from tests.helpers.oracle import reference_model
from tests.helpers.prefill_decode import prefill_then_decode

FP32_ATOL = 1e-4
IDS = [1, 306, 4658, 278, 6593, 310, 2834, 338, 1000, 2000] * 8  # 80 tokens: one streamed chunk


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint):
    ref = reference_model(tiny_checkpoint, torch.float32)
    with torch.no_grad():
        return ref(input_ids=torch.tensor([IDS])).logits[0]


def _run(model: LoadedModel, prefill: int) -> torch.Tensor:
    return prefill_then_decode(model, IDS, prefill)


@pytest.mark.parametrize("slots", [0, 1, 3])
@pytest.mark.parametrize("cpu_misses", [True, False], ids=["cpu-misses", "copies-only"])
@pytest.mark.parametrize("targets", [1, 2], ids=["one-target", "two-targets"])
def test_offloaded_logits_match_reference(tiny_checkpoint, reference_logits, slots, cpu_misses, targets):
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=slots,
                                                     num_targets=targets))
    model.experts.cpu_misses = cpu_misses
    assert STREAM_MIN_TOKENS <= 70
    logits = _run(model, prefill=70)
    assert_close(f"slots={slots} cpu={cpu_misses} targets={targets}", logits, reference_logits, FP32_ATOL)
    counters = model.experts.counters()
    assert counters["hits"] + counters["misses"] > 0
    if slots == 0 and cpu_misses:
        assert counters["hits"] == 0 and counters["cpu_experts"] > 0
    if not cpu_misses:
        assert counters["cpu_experts"] == 0 and counters["bytes_copied"] > 0
    model.close()


@pytest.mark.skipif(not fp8_cpu.available(), reason="no C compiler: PyTorch serves FP8 on the CPU")
def test_fp8_cpu_misses_go_through_the_cpu_kernel_and_keep_the_reference_logits(
        tiny_checkpoint, reference_logits, monkeypatch):
    """Every expert a miss in the exact FP8 format: the prompt's and the decode steps' experts
    are computed by the FP8 CPU kernel straight from the shipped bytes."""
    calls: list[int] = []
    real_matmul = fp8_cpu.Kernel.matmul
    monkeypatch.setattr(fp8_cpu.Kernel, "matmul",
                        lambda self, x, *a: (calls.append(len(x)), real_matmul(self, x, *a))[1])
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=0,
                                                     host_format="fp8"))
    assert_close("fp8 through the CPU kernel", _run(model, prefill=70), reference_logits, FP32_ATOL)
    assert 1 in calls and max(calls) > 1  # decode steps' experts, and the prompt's
    model.close()


def test_mmap_host_store_matches(tiny_checkpoint, reference_logits):
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    model.experts.close()
    from engine.experts.offload import OffloadedExperts

    model.experts = OffloadedExperts(model.ckpt, torch.float32, model.layer_devices, 2, host_mode="mmap")
    model.decoder.experts = model.experts
    assert model.experts.store.mode == "mmap"
    assert_close("mmap", _run(model, prefill=10), reference_logits, FP32_ATOL)
    model.close()


def test_offloaded_greedy_generation_equals_resident(tiny_checkpoint):
    msg = api.ChatMessage("user", "Write a long story about a lighthouse keeper.")
    params = api.SamplingParams(temperature=0.0, max_tokens=24)
    outputs, hit_rates = [], []
    for slots in (None, 2):
        model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=slots))
        prompt = model.formatter.build([msg], "", "none")
        result = Generator(model, prompt, params, model.decoder.new_cache(), prefill_chunk=16).run()
        outputs.append(result.output_ids)
        hit_rates.append(model.experts.counters().get("hit_rate", 1.0) if slots else 1.0)
        model.close()
    assert outputs[0] == outputs[1]
    assert 0.0 < hit_rates[1] < 1.0


def test_routing_is_recorded_per_token_and_layer(tiny_checkpoint, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "routing.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--model", str(tiny_checkpoint), "--prompt", "Hi",
         "--greedy", "--max-tokens", "3", "--device", "cpu", "--expert-cache-slots", "2",
         "--prefetch", "--record-routing", str(out), "--json"], capture_output=True, text=True,
        timeout=180)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["expert_hits"] + stats["expert_misses"] > 0 and stats["bytes_copied"] > 0
    from engine.experts.traces import read_trace

    trace, num_experts = read_trace(out)
    prompt_len = len(json.loads(proc.stdout)["prompt_ids"])
    assert num_experts == 8 and trace.shape == (prompt_len + 2, 2, 2)
    assert all(len(set(trace[t, layer].tolist())) == 2 for t in range(trace.shape[0]) for layer in range(2))


def test_int8_host_format_cpu_kernel_matches_its_dequantised_weights():
    from engine.experts.compute import cpu_expert_forward, dequant_expert, expert_forward
    from engine.experts.store import requantize_int8

    gen = torch.Generator().manual_seed(0)
    gu = (torch.randn(2, 64, 32, generator=gen) * 50).to(torch.float8_e4m3fn)
    dn = (torch.randn(2, 32, 32, generator=gen) * 50).to(torch.float8_e4m3fn)
    scales = torch.tensor([0.01, 0.02])
    gu_q, gu_s = requantize_int8(gu, scales)
    dn_q, dn_s = requantize_int8(dn, scales)
    x = torch.randn(3, 32, generator=gen)
    ours = cpu_expert_forward(x, gu_q[1], gu_s[1], dn_q[1], dn_s[1], torch.float32)
    ref = expert_forward(x, *dequant_expert(gu_q[1], gu_s[1], dn_q[1], dn_s[1], torch.float32))
    assert_close("int8 kernel", ours, ref, 1e-3, rtol=1e-3)
    exact = expert_forward(x, *dequant_expert(gu[1], scales[1], dn[1], scales[1], torch.float32))
    assert float((ours - exact).abs().mean() / exact.abs().mean()) < 0.02  # requantisation error


def test_int8_host_format_stays_close_to_the_fp8_reference(tiny_checkpoint, reference_logits):
    """int8 per-row requantisation is lossy: measured on this tiny model, mean |diff| ~0.009 and
    ~97% of positions keep the reference's top token (near-tie routing flips dominate the max)."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2,
                                                     host_format="int8"))
    assert model.experts.store.layers[0].gate_up.dtype == torch.int8
    logits = _run(model, prefill=70)
    assert float((logits - reference_logits).abs().mean()) < 0.03
    agreement = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()
    assert float(agreement) >= 0.9
    model.close()


def _profile(model: LoadedModel, profile: MachineProfile) -> None:
    """The rates a GPU load measures, given to the (CPU) layers' device."""
    model.experts.profiles = {torch.device("cpu"): profile}


def test_misses_are_split_between_copies_and_cpu_by_bandwidth(tiny_checkpoint, reference_logits):
    """With PCIe twice as fast as the CPU path, about two thirds of a step's misses are copied."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=0))
    _profile(model, MachineProfile(2.0e9, 1.0e9, 1.0e6, "test"))
    assert model.experts._num_copies(0, 6, 1000) == 4
    _profile(model, MachineProfile(1.0e9, 0.0, 0.0, "test"))
    assert model.experts._num_copies(0, 5, 1000) == 5
    # Rates are per GPU (each has its own link): a layer whose device has none copies them all.
    model.experts.profiles = {torch.device("cuda", 1): MachineProfile(2.0e9, 1.0e9, 1.0e6, "test")}
    assert model.experts._num_copies(0, 6, 1000) == 6
    model.close()
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=3))
    _profile(model, MachineProfile(1.0e9, 1.0e9, 1.0e9, "test"))
    assert_close("split", _run(model, prefill=70), reference_logits, FP32_ATOL)
    counters = model.experts.counters()
    assert counters["cpu_experts"] > 0 and counters["bytes_copied"] > 0
    assert counters["wait_cpu_s"] > 0 and counters["wait_routing_s"] > 0  # both waits timed
    model.experts.reset_counters()
    assert model.experts.counters()["wait_cpu_s"] == model.experts.counters()["wait_routing_s"] == 0
    model.close()


def test_short_prefill_chunks_share_streamed_experts_with_the_cpu(tiny_checkpoint, reference_logits):
    """A streamed chunk's few-token experts are computed on the CPU thread while the rest are
    streamed; the sum keeps expert id order, so the logits match as when all are streamed."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    experts = model.experts
    # Equal rates: the CPU takes about half of each layer's missing experts, fewest tokens first.
    _profile(model, MachineProfile(1.0e9, 1.0e9, 1.0e9, "test"))
    cache = model.decoder.new_cache()
    logits = model.forward(model.embed_ids(IDS[:70]), cache, logits_for="all")
    assert_close("streamed split", logits, reference_logits[:70], FP32_ATOL)
    counters = experts.counters()
    num_experts = model.config.n_routed_experts * model.config.num_hidden_layers
    assert 0 < counters["cpu_experts"] < num_experts
    # A CPU far slower per token than a copy keeps every expert on the stream.
    experts.reset_counters()
    _profile(model, MachineProfile(1.0e9, 1.0e9, 1.0, "test"))
    model.forward(model.embed_ids(IDS[:70]), model.decoder.new_cache(), logits_for="all")
    assert experts.counters()["cpu_experts"] == 0
    model.close()


def test_a_cpu_only_prefill_computes_missing_experts_from_the_host_format(tiny_checkpoint,
                                                                         reference_logits):
    """Without a GPU (no machine profile) there is nothing to stream to: a prompt's missing
    experts run on the CPU path straight from the host format, and the logits keep the
    reference (the chunk's routing counts still seed the slots for decode)."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    assert not model.experts.profiles
    logits = model.forward(model.embed_ids(IDS[:70]), model.decoder.new_cache(), logits_for="all")
    assert_close("cpu-only streamed prefill", logits, reference_logits[:70], FP32_ATOL)
    counters = model.experts.counters()
    assert counters["cpu_experts"] > 0
    model.close()


def test_machine_profile_is_measured_once_and_stored(tmp_path):
    from engine.experts.profile import load_or_measure

    path = tmp_path / "profile.json"
    first = load_or_measure(torch.device("cpu"), "int8", 64, 32, torch.float32, path)
    assert first.cpu_expert_bytes_per_s > 0 and path.is_file()
    again = load_or_measure(torch.device("cpu"), "int8", 64, 32, torch.float32, path)
    assert again == first


def test_machine_profile_keeps_the_best_of_two_measurements(tmp_path, monkeypatch):
    """Stored for good: a measurement taken while something else held the cores must not set
    every later split."""
    from engine.bench import machine
    from engine.experts.profile import load_or_measure

    rates = iter([5.8e9, 66e9, 900.0, 1000.0])
    monkeypatch.setattr(machine, "pcie_bandwidth", lambda device=None: 50e9)
    monkeypatch.setattr(machine, "cpu_expert_bandwidth", lambda *a: next(rates))
    monkeypatch.setattr(machine, "cpu_expert_token_rate", lambda *a: next(rates))
    profile = load_or_measure(torch.device("cpu"), "int8", 64, 32, torch.float32, tmp_path / "p.json")
    assert (profile.cpu_expert_bytes_per_s, profile.cpu_expert_tokens_per_s) == (66e9, 1000.0)


@pytest.mark.parametrize("slots", [0, 2])
def test_bf16_offload_is_bit_identical_to_resident(tiny_checkpoint, slots, dequantised_cpu_misses):
    """Where an expert runs (slot, staging, CPU thread) never changes the result: the same
    dequantisation, the same sum order."""
    resident = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16"))
    offloaded = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16", expert_cache_slots=slots))
    assert torch.equal(_run(resident, prefill=70), _run(offloaded, prefill=70))
    offloaded.close()


@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("targets", [1, 2], ids=["one-target", "two-targets"])
def test_prefetch_keeps_the_reference_logits(tiny_checkpoint, reference_logits, slots, targets):
    """Prefetch only changes which experts sit in slots, never a result."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=slots,
                                                     num_targets=targets, prefetch=True))
    assert_close(f"prefetch slots={slots} targets={targets}", _run(model, prefill=70),
                 reference_logits, FP32_ATOL)
    counters = model.experts.counters()
    assert counters["prefetch_issued"] > 0
    assert counters["prefetch_used"] + counters["prefetch_wasted"] <= counters["prefetch_issued"]
    model.close()


def test_prefetch_is_bit_identical_in_bf16(tiny_checkpoint, dequantised_cpu_misses):
    plain = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16", expert_cache_slots=2))
    prefetched = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16", expert_cache_slots=2,
                                                          prefetch=True))
    assert torch.equal(_run(plain, prefill=70), _run(prefetched, prefill=70))
    plain.close()
    prefetched.close()


def test_a_perfect_prediction_turns_every_later_layer_miss_into_a_hit(tiny_checkpoint):
    """With the next layer's true experts predicted (forced routing, no prediction error),
    every decode use of layer 1 finds its expert already copied; layer 0 still misses."""
    from engine.bench.measure import TraceRouting
    from engine.experts.traces import random_trace

    trace = random_trace(40, 2, 8, 2, seed=3)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2,
                                                     prefetch=True))
    model.decoder.experts = TraceRouting(model.experts, trace, prediction_error=0.0)
    model.experts.routing_log = []
    cache = model.decoder.new_cache()
    for t in range(30):
        model.forward(model.embed_ids([IDS[t]]), cache)
    counters = model.experts.counters()
    assert counters["prefetch_issued"] > 0 and counters["prefetch_wasted"] == 0
    assert counters["prefetch_used"] == counters["prefetch_issued"]
    # Every layer-1 use hits, so all misses are layer 0's: at most 2 per token.
    assert counters["misses"] <= 2 * 30 and counters["hits"] >= 2 * 30
    model.close()


def test_per_layer_slot_counts_from_the_plan(tiny_checkpoint, reference_logits):
    """The plan may give later layers one slot more than earlier ones; every slot is used."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=1,
                                                     layer_slots=(1, 3)))
    assert [s.gate_up.shape[0] for s in model.experts.layers] == [1, 3]
    assert [s.first_slot for s in model.experts.layers] == [0, 1]
    assert_close("layer slots (1, 3)", _run(model, prefill=70), reference_logits, FP32_ATOL)
    assert len(model.experts.policy) == 4
    model.close()


def test_grouped_decode_path_passes_the_right_slots_and_scales(tiny_checkpoint, monkeypatch,
                                                              dequantised_cpu_misses):
    """The grouped GPU kernel's bookkeeping, on the CPU: each cached expert of a decode step
    is computed from its own slot with its own scales (the kernel replaced by the eager
    dequantise path), so the result is bit-identical to the resident engine's."""
    from engine.experts import fp8_kernel
    from engine.experts.compute import dequant_expert, expert_forward

    calls = []

    def eager_grouped(x, gate_up_slots, down_slots, slot_ids, gate_up_scales, down_scales,
                      expert_ids):  # the layer's scale tables, read at expert_ids
        calls.append(len(slot_ids))
        return torch.stack([expert_forward(x, *dequant_expert(
            gate_up_slots[s], gate_up_scales[e], down_slots[s], down_scales[e], torch.bfloat16))
            for s, e in zip(slot_ids.tolist(), expert_ids.tolist(), strict=True)])

    monkeypatch.setattr(fp8_kernel, "grouped_expert_forward", eager_grouped)
    resident = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16"))
    offloaded = LoadedModel(tiny_checkpoint, LoadOptions(dtype="bfloat16", expert_cache_slots=3,
                                                         host_format="fp8"))
    for slots in offloaded.experts.layers:
        slots.use_grouped = True
    assert torch.equal(_run(resident, prefill=70), _run(offloaded, prefill=70))
    assert calls and max(calls) <= 2  # top-2: at most both experts of a step from slots
    offloaded.close()


def test_short_ram_serves_fp8_from_the_mapped_files(tiny_checkpoint, reference_logits):
    """int8 exists only as a copy in RAM: with RAM short (mmap), "auto" picks FP8, and an
    explicit int8 falls back to FP8 from the mapped files instead of running out of memory."""
    from engine.experts.offload import OffloadedExperts
    from engine.planning import auto_host_format

    assert auto_host_format(2, "pinned") == "int8" and auto_host_format(2, "mmap") == "fp8"
    assert auto_host_format(None, "pinned") == "fp8"
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    model.experts.close()
    model.experts = OffloadedExperts(model.ckpt, torch.float32, model.layer_devices, 2,
                                     host_mode="mmap", host_format="int8")
    model.decoder.experts = model.experts
    assert (model.experts.store.mode, model.experts.store.fmt) == ("mmap", "fp8")
    assert_close("int8 asked, mmap", _run(model, prefill=10), reference_logits, FP32_ATOL)
    model.close()


def test_int8_requantisation_rounds_each_row_to_its_own_scale():
    """Every weight is within half a step of its row's scale, the row maximum maps to +-127,
    and an all-zero row stays zero (with a tiny positive scale, never a division by zero)."""
    from engine.experts.store import requantize_int8

    gen = torch.Generator().manual_seed(5)
    fp8 = (torch.randn(3, 6, 40, generator=gen) * 30).to(torch.float8_e4m3fn)
    fp8[1, 2] = 0
    scales = torch.tensor([0.002, 0.01, 0.5])
    codes, rows = requantize_int8(fp8, scales)
    exact = fp8.float() * scales[:, None, None]
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    # Half a step, plus fp32 rounding at exact ties (measured 6e-6 of a step; a wrong code is 0.5).
    assert ((codes.float() * rows[..., None] - exact).abs() <= rows[..., None] * (0.5 + 1e-4)).all()
    peak_codes = codes.abs().amax(dim=-1)
    assert (peak_codes[exact.abs().amax(dim=-1) > 0] == 127).all()
    assert (codes[1, 2] == 0).all() and 0 < float(rows[1, 2]) <= 1e-12


def test_reading_an_image_first_frees_the_prefill_staging(tiny_checkpoint, tmp_path):
    """The vision encoder borrows the prefill workspace (engine.placement): the staging buffers
    a long chunk left behind are released before it runs, and made again by the next chunk."""
    from PIL import Image

    img_path = tmp_path / "photo.png"
    Image.new("RGB", (56, 56), (200, 30, 30)).save(img_path)
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    model.experts._buffers[torch.device("cpu")] = object()  # as a GPU prefill leaves them
    prompt = model.formatter.build([api.ChatMessage("user", "What is this?", images=(img_path,))],
                                   "", "none")
    embeds = model.embed_prompt(prompt, 0)
    assert model.experts._buffers == {} and embeds.shape[0] == len(prompt.ids)
    model.close()


def test_the_split_holds_when_the_policy_would_bypass(tiny_checkpoint, reference_logits):
    """With measured rates, each step's PCIe share is copied and cached even where the policy
    alone would bypass: the CPU takes only its share (equal rates: floor(m / 2) of m misses,
    ties going to copies), never the bypassed rest on top."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=2))
    _profile(model, MachineProfile(1.0e9, 1.0e9, 1.0e9, "test"))
    assert_close("balanced split", _run(model, prefill=10), reference_logits, FP32_ATOL)
    counters = model.experts.counters()
    assert counters["misses"] > 20
    assert counters["cpu_experts"] <= counters["misses"] // 2
    model.close()


def test_a_steps_cpu_experts_are_one_job_beside_a_gpu_and_inline_on_a_cpu(tiny_checkpoint,
                                                                           reference_logits):
    """Beside a GPU (here: with measured rates) all of a step's CPU experts go to the CPU thread
    as one job, one hand-off; on a CPU layer they run inline, the pool unused. Same logits."""
    for measured in (True, False):
        model = LoadedModel(tiny_checkpoint, LoadOptions(dtype="float32", expert_cache_slots=1))
        if measured:  # a CPU far faster than the link: every miss goes to the CPU
            _profile(model, MachineProfile(1.0e6, 1.0e12, 1.0e9, "test"))
        pool = model.experts._cpu_pool
        submitted: list = []
        pool.submit = lambda fn, submit=pool.submit, jobs=submitted: jobs.append(fn) or submit(fn)
        assert_close(f"cpu experts, measured={measured}", _run(model, prefill=10), reference_logits,
                     FP32_ATOL)
        num_cpu = model.experts.counters()["cpu_experts"]
        assert num_cpu > 0
        if measured:  # top-2: steps with two misses send both in one job
            assert 0 < len(submitted) < num_cpu
        else:
            assert submitted == []
        model.close()


def test_a_chunks_routes_list_each_experts_tokens_in_token_order():
    """run_experts adds outputs per expert in the order _routes lists tokens: the sorted form
    must list exactly what a loop over tokens and their choices lists."""
    from engine.model.moe import _routes

    gen = torch.Generator().manual_seed(0)
    top_idx = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(300)])
    expected: dict[int, tuple[list[int], list[int]]] = {}
    for t, row in enumerate(top_idx.tolist()):
        for k, e in enumerate(row):
            expected.setdefault(e, ([], []))[0].append(t)
            expected[e][1].append(k)
    routes = _routes(top_idx, torch.device("cpu"))
    assert list(routes) == sorted(expected)
    assert {e: (t.tolist(), s.tolist()) for e, (t, s) in routes.items()} == expected
    assert _routes(top_idx[:1], torch.device("cpu")) == {e: (None, k) for k, e in
                                                          sorted(enumerate(top_idx[0].tolist()), key=lambda ke: ke[1])}

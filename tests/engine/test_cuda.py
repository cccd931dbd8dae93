"""The CUDA paths against the reference (skipped without a GPU; run with `pytest -m cuda`).

Tolerances: fp32 on the GPU with TF32 disabled, 1e-3 absolute (cuBLAS reduction order
differs from the CPU); bf16 as in test_parity (0.25 max, 0.03 mean).
"""

from __future__ import annotations

import pytest
import torch

from engine import api
from engine.experts.pinned import is_page_locked
from engine.generate import Generator
from engine.runtime import LoadedModel, LoadOptions
from tests.helpers.assert_close import assert_close
from tests.helpers.oracle import reference_model

pytestmark = pytest.mark.cuda
IDS = [1, 306, 4658, 278, 6593, 310, 2834, 338, 1000, 2000] * 8


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint):
    ref = reference_model(tiny_checkpoint, torch.float32)
    with torch.no_grad():
        return ref(input_ids=torch.tensor([IDS])).logits[0]


def _logits(model: LoadedModel, prefill: int = 70) -> torch.Tensor:
    cache = model.decoder.new_cache()
    outs = [model.forward(model.embed_ids(IDS[:prefill]), cache, logits_for="all")]
    for t in range(prefill, len(IDS)):
        outs.append(model.forward(model.embed_ids(IDS[t : t + 1]), cache, logits_for="all"))
    return torch.cat(outs).cpu()


@pytest.mark.parametrize("slots", [None, 0, 2], ids=["resident", "no-cache", "two-slots"])
@pytest.mark.parametrize("targets", [1, 2])
def test_cuda_logits_match_reference(tiny_checkpoint, reference_logits, slots, targets):
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="float32",
                                                     expert_cache_slots=slots, num_targets=targets))
    assert all(d.type == "cuda" for d in model.layer_devices)
    assert_close(f"cuda slots={slots} targets={targets}", _logits(model), reference_logits, 1e-3)
    if slots is not None:
        assert model.experts.store.mode == "pinned"
        assert is_page_locked(model.experts.store.layers[0].gate_up)
    model.close()


def test_cuda_bf16_prefill_matches_reference(tiny_checkpoint):
    ref = reference_model(tiny_checkpoint, torch.bfloat16)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([IDS[:16]])).logits[0]
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="bfloat16"))
    ours = model.forward(model.embed_ids(IDS[:16]), model.decoder.new_cache(), logits_for="all")
    assert_close("cuda bf16", ours.cpu(), expected, 0.25, mean_atol=0.03)


def test_cuda_greedy_generation_equals_cpu(tiny_checkpoint):
    msg = api.ChatMessage("user", "Write a long story about a lighthouse keeper.")
    params = api.SamplingParams(temperature=0.0, max_tokens=24)
    outputs = []
    for device, slots in (("cpu", None), ("cuda", 2)):
        model = LoadedModel(tiny_checkpoint, LoadOptions(device=device, dtype="float32",
                                                         expert_cache_slots=slots))
        prompt = model.formatter.build([msg], "", "none")
        outputs.append(Generator(model, prompt, params, model.decoder.new_cache()).run().output_ids)
        model.close()
    assert outputs[0] == outputs[1]


def test_fp8_kernel_matches_the_eager_path():
    from engine.experts import fp8_kernel
    from engine.experts.compute import dequant_expert, expert_forward

    assert fp8_kernel.kernel_usable(torch.device("cuda:0"), 256, 128)
    gen = torch.Generator().manual_seed(3)
    gu = (torch.randn(256, 256, generator=gen) * 20).to(torch.float8_e4m3fn).cuda()
    dn = (torch.randn(256, 128, generator=gen) * 20).to(torch.float8_e4m3fn).cuda()
    s1, s2 = torch.tensor(0.003), torch.tensor(0.004)
    from engine.experts.store import requantize_int8

    gu_q, gu_rows = requantize_int8(gu.cpu()[None], s1[None])
    dn_q, dn_rows = requantize_int8(dn.cpu()[None], s2[None])
    formats = {"fp8": (gu, s1, dn, s2),
               "int8": (gu_q[0].cuda(), gu_rows[0], dn_q[0].cuda(), dn_rows[0])}
    for name, (w1, w1_s, w2, w2_s) in formats.items():
        for tokens in (1, 4, 16):
            x = torch.randn(tokens, 256, generator=gen).cuda().to(torch.bfloat16)
            ours = fp8_kernel.fp8_expert_forward(x, w1, w1_s, w2, w2_s)
            ref = expert_forward(x, *dequant_expert(w1, w1_s, w2, w2_s, torch.bfloat16))
            assert_close(f"{name} kernel t={tokens}", ours, ref, 0.02 * float(ref.abs().max()))


def test_cuda_bf16_offload_with_prefetch_and_grouped_kernel(tiny_checkpoint, monkeypatch):
    """The decode path a 24 GB card runs: bf16, FP8 slots through the grouped kernel, next-layer
    prefetch on a side stream, CPU misses, all-hit layers ended by the combine kernel; logits as
    close to the resident GPU engine as bf16 parity allows (the kernel's summation order differs)."""
    from engine.experts import offload

    combined = []
    combine = offload.combine
    monkeypatch.setattr(offload, "combine", lambda *a: combined.append(1) or combine(*a))
    resident = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="bfloat16"))
    expected = _logits(resident)
    resident.close()
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="bfloat16",
                                                     expert_cache_slots=2, host_format="fp8",
                                                     prefetch=True))
    assert all(slots.use_grouped for slots in model.experts.layers), "grouped kernel disabled"
    assert_close("cuda bf16 offload+prefetch", _logits(model), expected, 0.25, mean_atol=0.03)
    steps = model.decoder.decode_steps  # decode ran as CUDA graphs, with the prediction inside
    assert steps is not None and not steps.failed and steps._captured
    counters = model.experts.counters()
    assert counters["prefetch_issued"] > 0 and counters["hits"] > 0
    assert combined, "the combine kernel never ended a layer (self-test failed?)"
    model.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_split_layers_and_keep_the_kernels(tiny_checkpoint, reference_logits):
    """Layers on cuda:1 launch their Triton kernels there (not on the current device)."""
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="float32", gpus=(0, 1),
                                                     expert_cache_slots=2))
    assert [d.index for d in model.layer_devices] == [0, 1]
    assert set(model.experts.profiles) == set(model.layer_devices)  # one PCIe link each
    assert_close("two gpus", _logits(model), reference_logits, 1e-3)
    steps = model.decoder.decode_steps
    assert steps is not None and not steps.failed and len(steps._captured) == 2
    model.close()
    bf16 = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="bfloat16", gpus=(0, 1),
                                                    expert_cache_slots=2, host_format="fp8"))
    assert all(slots.use_grouped for slots in bf16.experts.layers)
    bf16.close()


def test_cuda_graph_decode_matches_eager_decode(tiny_checkpoint):
    """Each layer's dense part captured as a CUDA graph: the same greedy tokens and logits as
    eager decode, through a cache regrowth (which recaptures), without falling back."""
    from engine.kv.cache import MIN_CAPACITY
    from tests.engine.test_decode_graph import _decode

    prompt = list(range(100, 100 + MIN_CAPACITY - 6))
    results = []
    for graphs in (False, True):
        model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="float32",
                                                         expert_cache_slots=2, cuda_graphs=graphs))
        results.append(_decode(model, prompt, 12))
        if graphs:
            steps = model.decoder.decode_steps
            assert steps is not None and not steps.failed
            assert len(steps._captured) == model.config.num_hidden_layers
        model.close()
    (eager, eager_ids), (graphed, graphed_ids) = results
    assert graphed_ids == eager_ids
    assert_close("cuda graphs", graphed.cpu(), eager.cpu(), 1e-3)


def test_cuda_streamed_prefill_reuses_its_staging_buffers(tiny_checkpoint, reference_logits,
                                                          monkeypatch):
    """Groups of 2 experts: a prefill chunk's 8 experts pass through the two staging buffers
    twice each, so every refill must wait for the compute that read the buffer before."""
    from engine.experts import streaming

    monkeypatch.setattr(streaming, "GROUP", 2)
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="float32",
                                                     expert_cache_slots=0))
    assert_close("streamed groups of 2", _logits(model, prefill=70), reference_logits, 1e-3)
    model.close()


@pytest.mark.parametrize("guess", ["right", "wrong"])
def test_cuda_long_chunks_copy_the_next_layers_first_groups_ahead(tiny_checkpoint, reference_logits,
                                                                  monkeypatch, guess):
    """Each layer's first two staging groups are copied while its attention runs. A right guess
    is adopted (no second copy); a wrong one is replaced by copies queued after it on the same
    stream. Either way the logits are the reference's."""
    from engine.experts import offload, streaming

    monkeypatch.setattr(streaming, "GROUP", 2)
    monkeypatch.setattr(offload, "LOOKAHEAD_MIN_TOKENS", 64)
    copy_group = streaming._copy_group

    def slow_copy_group(buffers, host, experts, g):  # a missing wait would read stale buffers
        with torch.cuda.stream(buffers.stream):
            torch.cuda._sleep(2_000_000)
        copy_group(buffers, host, experts, g)

    monkeypatch.setattr(streaming, "_copy_group", slow_copy_group)
    if guess == "wrong":
        monkeypatch.setattr(offload, "experts_ahead", lambda n, cached: list(range(n))[::-1][:4])
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="float32",
                                                     expert_cache_slots=0))
    assert_close(f"copied ahead, {guess} guess", _logits(model, prefill=70), reference_logits, 1e-3)
    counters = model.experts.counters()
    assert counters["prefill_ahead_issued"] == model.config.num_hidden_layers  # one 70-token chunk
    assert counters["prefill_ahead_used"] == (counters["prefill_ahead_issued"] if guess == "right" else 0)
    model.close()


def test_cuda_image_prompt_borrows_the_gpu_only_while_encoding(tiny_checkpoint, tmp_path):
    """The vision encoder's weights live in pinned host memory; an image is read on the GPU
    with copies that are freed after (the placement plan gives that room to expert slots)."""
    from PIL import Image

    img_path = tmp_path / "photo.png"
    Image.effect_mandelbrot((90, 60), (-2.0, -1.2, 1.0, 1.2), 64).convert("RGB").save(img_path)
    msg = api.ChatMessage("user", "What is in this picture?", images=(img_path,))
    on_cpu = LoadedModel(tiny_checkpoint, LoadOptions(device="cpu", dtype="float32"))
    prompt = on_cpu.formatter.build([msg], "", "none")
    expected = on_cpu.forward(on_cpu.embed_prompt(prompt, 0), on_cpu.decoder.new_cache(),
                              logits_for="all")
    model = LoadedModel(tiny_checkpoint, LoadOptions(device="cuda", dtype="float32",
                                                     expert_cache_slots=2))
    vision = model.vision
    assert all(is_page_locked(t) for part in vision._host.values() for t in part.values())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    embeds = model.embed_prompt(prompt, 0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before  # the encoder's copies are gone
    assert model.experts._buffers == {}  # no staging held while an image is read
    assert embeds.device.type == "cpu"
    ours = model.forward(embeds, model.decoder.new_cache(), logits_for="all").cpu()
    assert_close("cuda image prompt", ours, expected, 1e-3)
    model.close()
    on_cpu.close()


def test_cuda_largest_image_fits_the_workspace_the_plan_lends_the_encoder():
    """The plan gives the vision encoder weights + VISION_ACTIVATION_BYTES of the first GPU's
    workspace (an estimate until this runs). Measured at the real widths on the largest image
    (1540 px: 12,100 patches, one block mask): activations are freed layer by layer, so two
    layers peak as 24 do. The projector after it (patch merging, two small linears on a
    quarter of the patches) peaks far lower and is left out."""
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

    from engine.placement import VISION_ACTIVATION_BYTES

    config = PixtralVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                 num_attention_heads=16, head_dim=64, image_size=1540,
                                 patch_size=14, hidden_act="silu")
    config._attn_implementation = "sdpa"
    tower = PixtralVisionModel(config).to("cuda", torch.bfloat16).eval()
    pixels = torch.randn(1, 3, 1540, 1540, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = tower(pixels, image_sizes=torch.tensor([[1540, 1540]]), return_dict=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert out.last_hidden_state.shape[-2:] == (110 * 110, 1024)
    assert peak <= VISION_ACTIVATION_BYTES, f"peak {peak / 2**30:.2f} GiB"


def test_requantising_on_the_gpu_is_bit_identical_for_int8():
    """A GPU load requantises the default int8 host format on the GPU: the same codes and row
    scales as the CPU, bit for bit, into page-locked memory."""
    from engine.experts.pinned import host_empty
    from engine.experts.store import requantize_int8

    gen = torch.Generator().manual_seed(6)
    weights = (torch.randn(3, 128, 192, generator=gen) * 40).to(torch.float8_e4m3fn)
    weights[1, 5] = 0  # an all-zero row keeps its tiny scale
    scales = torch.tensor([0.01, 0.02, 0.005])
    codes, rows = requantize_int8(weights, scales)
    out = host_empty(tuple(weights.shape), torch.int8, pin=True)
    gpu_codes, gpu_rows = requantize_int8(weights, scales, out, torch.device("cuda"))
    assert gpu_codes.data_ptr() == out.data_ptr() and is_page_locked(out)
    assert torch.equal(gpu_codes, codes) and torch.equal(gpu_rows, rows) and gpu_rows.device.type == "cpu"

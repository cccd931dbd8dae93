"""The baseline measured in the same run: transformers' Mistral3ForConditionalGeneration with
accelerate's CPU offload (what a user gets without Quire: whole layers move per forward)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from engine.checkpoint import Checkpoint
from engine.quant import dequantize


def _state_dict(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = {}
    for name in ckpt.tensors:
        if name.endswith(("activation_scale", "scale_inv")):
            continue
        scale_name = name + "_scale_inv" if name.endswith("proj") else \
            name.removesuffix(".weight") + ".weight_scale_inv"
        scale = ckpt.get(scale_name) if scale_name in ckpt.tensors else None
        sd[name] = dequantize(ckpt.get(name), scale, dtype)
    return sd


def hf_decode(model_dir: Path, num_tokens: int, real_layers: int) -> dict:
    """Decode tok/s of transformers (+ accelerate cpu_offload on a GPU), scaled to 36 layers."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ckpt = Checkpoint.open(model_dir)
    # The checkpoint's config in HF form (an NVFP4 release folder has params.json only); its
    # weights dequantised below, under the engine's (HF) names.
    config = Mistral3Config.from_dict({k: v for k, v in ckpt.raw_config.items() if k != "quantization_config"})
    model = Mistral3ForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=_state_dict(ckpt, torch.bfloat16), dtype=torch.bfloat16).eval()
    mode = "cpu"
    if torch.cuda.is_available():
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=torch.device("cuda:0"))
        mode = "accelerate cpu_offload -> cuda:0"
    ids = torch.tensor([[1, 3, 1000, 2000, 4]])
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(num_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    per_token = statistics.median(times) * real_layers / ckpt.config.num_hidden_layers
    return {"mode": mode, "n_gen": num_tokens, "tg_ts": 1.0 / per_token,
            "measured_ms_per_token": 1e3 * statistics.median(times)}

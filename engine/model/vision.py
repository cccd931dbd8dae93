"""The Pixtral vision encoder and the Mistral 3 projector, reusing transformers' modules
(allowed by design: the decode hot path is ours, the vision tower runs once per image)."""

from __future__ import annotations

import torch
from torch.func import functional_call

from engine.checkpoint import Checkpoint


class VisionTower:
    """image pixels -> projected features [num [IMG] tokens, H] for the text model."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import Mistral3Config
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
        from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

        raw = {k: v for k, v in ckpt.raw_config.items() if k != "quantization_config"}
        config = Mistral3Config.from_dict(raw)
        config.vision_config._attn_implementation = "sdpa"
        self.tower = PixtralVisionModel(config.vision_config)
        self.projector = Mistral3MultiModalProjector(config)
        self._load(ckpt, "vision_tower.", self.tower)
        self._load(ckpt, "multi_modal_projector.", self.projector)
        # The weights stay in host memory (page-locked for a GPU): on a GPU load they are copied
        # in for each image and dropped after, borrowing the idle prefill workspace instead of
        # holding 0.81 GB of expert-slot room for good (engine.placement).
        self.tower.to(dtype=dtype).eval()
        self.projector.to(dtype=dtype).eval()
        self._host = {part: {name: _pinned(t) if device.type == "cuda" else t
                             for name, t in _state(module).items()}
                      for part, module in (("tower", self.tower), ("projector", self.projector))}
        # The modules keep only their code: every run passes `_host`'s tensors in, so no
        # second host copy is held (and a tensor left out would fail loudly on "meta").
        self.tower.to("meta")
        self.projector.to("meta")
        self.patch = int(config.vision_config.patch_size)
        self.device, self.dtype = device, dtype

    @staticmethod
    def _load(ckpt: Checkpoint, prefix: str, module: torch.nn.Module) -> None:
        sd = {n[len(prefix):]: ckpt.get(n) for n in ckpt.tensors if n.startswith(prefix)}
        module.load_state_dict(sd, strict=True)

    def on_device(self, part: str) -> dict[str, torch.Tensor]:
        """Every weight and buffer of "tower" or "projector" on the encoder's device (the host
        ones themselves on the CPU)."""
        return {name: t.to(self.device, non_blocking=True) for name, t in self._host[part].items()}

    @torch.no_grad()
    def encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """pixels: one [3, H, W] tensor per image (H, W multiples of 28)."""
        tower, projector = self.on_device("tower"), self.on_device("projector")
        feats = []
        for px in pixels:
            size = torch.tensor([[px.shape[1], px.shape[2]]])
            batch = px[None].to(device=self.device, dtype=self.dtype)
            # The last layer's output only: asking for every hidden state would hold all 24
            # (0.6 GB for the largest image) in the workspace the encoder borrows.
            out = functional_call(self.tower, tower, (batch,), {"image_sizes": size,
                                                                "return_dict": True})
            feats.append(functional_call(self.projector, projector,
                                         (out.last_hidden_state.squeeze(0), size)))
        return torch.cat(feats, dim=0)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (non-persistent ones too: a GPU run needs every tensor there)."""
    return {n: t.detach() for n, t in module.named_parameters()} | dict(module.named_buffers())


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t

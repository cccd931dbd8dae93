"""The Pixtral vision encoder and the Mistral 3 projector, reusing transformers' modules
(allowed by design: the decode hot path is ours, the vision tower runs once per image)."""

from __future__ import annotations

import torch

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
        self.tower.to(device=device, dtype=dtype).eval()
        self.projector.to(device=device, dtype=dtype).eval()
        self.patch = int(config.vision_config.patch_size)
        self.device, self.dtype = device, dtype

    @staticmethod
    def _load(ckpt: Checkpoint, prefix: str, module: torch.nn.Module) -> None:
        sd = {n[len(prefix):]: ckpt.get(n) for n in ckpt.tensors if n.startswith(prefix)}
        module.load_state_dict(sd, strict=True)

    @torch.no_grad()
    def encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """pixels: one [3, H, W] tensor per image (H, W multiples of 28)."""
        feats = []
        for px in pixels:
            size = torch.tensor([[px.shape[1], px.shape[2]]])
            batch = px[None].to(device=self.device, dtype=self.dtype)
            out = self.tower(batch, image_sizes=size, output_hidden_states=True, return_dict=True)
            feats.append(self.projector(out.hidden_states[-1].squeeze(0), size))
        return torch.cat(feats, dim=0)

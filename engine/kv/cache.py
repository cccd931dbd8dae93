"""The latent KV cache: per layer, the normed 256-wide latent and the rotated 64-wide k_rope.

Glossary: S cached tokens, T new tokens, C kv_lora_rank, R rope dims.
"""

from __future__ import annotations

import torch

MIN_CAPACITY = 256


class LatentKVCache:
    """Grows geometrically; `offset` is the number of committed tokens (same for all layers)."""

    def __init__(self, num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                 devices: list[torch.device] | None = None) -> None:
        self.num_layers = num_layers
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.dtype = dtype
        self.devices = devices or [torch.device("cpu")] * num_layers
        self.offset = 0
        self._latent: list[torch.Tensor | None] = [None] * num_layers  # [cap, C]
        self._rope: list[torch.Tensor | None] = [None] * num_layers  # [cap, R]

    def _reserve(self, layer: int, needed: int) -> None:
        buf = self._latent[layer]
        if buf is not None and buf.shape[0] >= needed:
            return
        capacity = max(MIN_CAPACITY, needed, 2 * (buf.shape[0] if buf is not None else 0))
        dev = self.devices[layer]
        latent = torch.zeros(capacity, self.kv_lora_rank, dtype=self.dtype, device=dev)
        rope = torch.zeros(capacity, self.rope_dim, dtype=self.dtype, device=dev)
        if buf is not None:
            latent[: self.offset] = buf[: self.offset]
            rope[: self.offset] = self._rope[layer][: self.offset]  # type: ignore[index]
        self._latent[layer], self._rope[layer] = latent, rope

    def reserve(self, num_tokens: int) -> None:
        """Make room for `num_tokens` in every layer at once (no regrowth copies mid-prefill)."""
        for layer in range(self.num_layers):
            self._reserve(layer, num_tokens)

    def update_and_fetch(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new entries after `offset`; return views of all S+T entries of the layer."""
        num_new = latent.shape[0]
        end = self.offset + num_new
        self._reserve(layer, end)
        lat_buf, rope_buf = self._latent[layer], self._rope[layer]
        assert lat_buf is not None and rope_buf is not None
        lat_buf[self.offset : end] = latent
        rope_buf[self.offset : end] = k_rope
        return lat_buf[:end], rope_buf[:end]

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole (latent [cap, C], k_rope [cap, R]) buffers, for a decode step that
        writes at a position held on the device (engine.model.decode_graph); reserve first."""
        lat_buf, rope_buf = self._latent[layer], self._rope[layer]
        assert lat_buf is not None and rope_buf is not None, "reserve() before buffers()"
        return lat_buf, rope_buf

    def buffer_ids(self) -> tuple[tuple[int, int], ...]:
        """Where the buffers live and how long they are: a captured decode step is valid for
        any cache whose buffers match (it knows addresses, not cache objects)."""
        return tuple((0, 0) if b is None else (b.data_ptr(), b.shape[0])
                     for b in self._latent + self._rope)

    @property
    def capacity(self) -> int:
        """Entries the smallest layer buffer holds (0 before the first write)."""
        return min((0 if b is None else b.shape[0]) for b in self._latent)

    def commit(self, num_new: int) -> None:
        """Called once all layers have written the T new tokens."""
        self.offset += num_new

    def trim(self, num_tokens: int) -> None:
        """Keep only the first `num_tokens` entries (to reuse a shared prefix)."""
        self.offset = min(self.offset, max(0, num_tokens))

    @property
    def nbytes(self) -> int:
        per_token = (self.kv_lora_rank + self.rope_dim) * torch.finfo(self.dtype).bits // 8
        return self.offset * per_token * self.num_layers

    def state(self, num_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """The first `num_tokens` committed entries (default: all) as CPU tensors."""
        n = self.offset if num_tokens is None else min(num_tokens, self.offset)
        out: dict[str, torch.Tensor] = {}
        for layer in range(self.num_layers):
            lat, rope = self._latent[layer], self._rope[layer]
            if lat is None or rope is None:
                lat = torch.zeros(0, self.kv_lora_rank, dtype=self.dtype)
                rope = torch.zeros(0, self.rope_dim, dtype=self.dtype)
            # A copy even on the CPU: the snapshot is written in the background while the
            # live cache may be trimmed and overwritten.
            out[f"latent.{layer}"] = lat[:n].to("cpu", copy=True).contiguous()
            out[f"k_rope.{layer}"] = rope[:n].to("cpu", copy=True).contiguous()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        num_tokens = state["latent.0"].shape[0]
        self.offset = 0
        for layer in range(self.num_layers):
            self._reserve(layer, num_tokens)
            self._latent[layer][:num_tokens] = state[f"latent.{layer}"].to(self.devices[layer])  # type: ignore[index]
            self._rope[layer][:num_tokens] = state[f"k_rope.{layer}"].to(self.devices[layer])  # type: ignore[index]
        self.offset = num_tokens

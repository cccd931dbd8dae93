"""One comparison helper for every engine path: prints max/mean differences on failure."""

from __future__ import annotations

import torch


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float = 0.0,
                 mean_atol: float | None = None) -> None:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    limit = atol + rtol * ref.abs()
    worst = float(diff.max())
    mean = float(diff.mean())
    assert bool((diff <= limit).all()), (
        f"{name}: max |diff| {worst:.3g} exceeds atol {atol} + rtol {rtol}; mean {mean:.3g}"
    )
    if mean_atol is not None:
        assert mean <= mean_atol, f"{name}: mean |diff| {mean:.3g} exceeds {mean_atol}"

"""Euler sampling of a velocity model from t = 1 (noise) to t = 0 (data)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .trainer import ForwardFn, default_forward


def make_noise(shape: Sequence[int], seed: int, device: Any = "cpu") -> torch.Tensor:
    """Gaussian noise that depends only on (shape, seed): drawn on the CPU, then moved, so a dense
    and a sparse model (or a CPU and a GPU run) start from the same x1."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g).to(device)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 to 0. ``shift`` > 1 spends more steps near t = 1, where the coarse
    layout is decided (the SD3 time shift t' = s t / (1 + (s - 1) t))."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def sample_euler(model: nn.Module, noise: torch.Tensor, cond: Any = None, steps: int = 32,
                 shift: float = 1.0, forward_fn: ForwardFn = default_forward,
                 amp: Optional[bool] = None) -> torch.Tensor:
    """Integrate dx/dt = u(x, t, c) from x(1) = noise to x(0) with ``steps`` Euler steps.

    Deterministic given ``noise``: there is no randomness inside (use :func:`make_noise`).
    """
    was_training = model.training
    model.eval()
    device = noise.device
    amp = amp if amp is not None else device.type == "cuda"
    x = noise.float()
    ts = time_grid(steps, shift).tolist()
    try:
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            t = torch.full((x.shape[0],), t_cur, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                u = forward_fn(model, x, t, cond)
            x = x + (t_next - t_cur) * u.float()
    finally:
        model.train(was_training)
    return x

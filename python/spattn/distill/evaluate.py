"""Quality and speed measurements of a sparse student against its dense teacher."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from .trainer import ForwardFn, _take, default_forward, interpolate, noise_and_time


@dataclass
class ProbeSet:
    """Held-out (x_t, t, cond) triples: the same inputs are fed to every model compared."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: Any

    def __len__(self) -> int:
        return self.x_t.shape[0]

    def chunk(self, start: int, stop: int):
        cond = self.cond
        if isinstance(cond, torch.Tensor) and cond.dim() > 0:
            cond = cond[start:stop]
        elif isinstance(cond, dict):
            cond = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                    for k, v in cond.items()}
        return self.x_t[start:stop], self.t[start:stop], cond


def make_probe_set(x0: torch.Tensor, cond: Any = None, seed: int = 1234,
                   t: Optional[torch.Tensor] = None) -> ProbeSet:
    """x_t from held-out data ``x0`` and seeded noise; ``t`` defaults to an even spread over
    (0, 1) so every part of the sampling trajectory is weighed."""
    x1, _ = noise_and_time(x0, seed, 0)
    if t is None:
        n = x0.shape[0]
        t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    t = t.to(x0.device)
    return ProbeSet(interpolate(x0, x1, t), t, cond)


@torch.no_grad()
def velocities(model: nn.Module, probe: ProbeSet, batch_size: int = 16,
               forward_fn: ForwardFn = default_forward, amp: Optional[bool] = None) -> torch.Tensor:
    was_training = model.training
    model.eval()
    amp = amp if amp is not None else probe.x_t.device.type == "cuda"
    out = []
    try:
        for s in range(0, len(probe), batch_size):
            x, t, c = probe.chunk(s, s + batch_size)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                out.append(forward_fn(model, x, t, c).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def relative_error(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """||pred - ref|| / ||ref|| over the whole set (not a mean of per-sample ratios, which small
    reference velocities would dominate)."""
    return float((pred.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def velocity_relative_error(student: nn.Module, teacher_or_velocities, probe: ProbeSet,
                            batch_size: int = 16, forward_fn: ForwardFn = default_forward) -> float:
    """Relative velocity error of ``student`` against the teacher (a model, or its velocities on
    ``probe`` computed once and reused across students)."""
    ref = teacher_or_velocities
    if isinstance(ref, nn.Module):
        ref = velocities(ref, probe, batch_size, forward_fn)
    return relative_error(velocities(student, probe, batch_size, forward_fn), ref)


def psnr(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over samples of the PSNR (dB) of ``pred`` against ``ref``; data_range 2 for [-1, 1]."""
    pred = pred.float().clamp(-data_range / 2, data_range / 2)
    ref = ref.float().clamp(-data_range / 2, data_range / 2)
    mse = ((pred - ref) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(data_range ** 2 / mse)).mean())


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1,
              device: Optional[torch.device] = None) -> float:
    """Median wall seconds of ``fn()``, synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class AttentionTiming:
    """Seconds and calls spent in attention; the model (or the hooks) add to both as it runs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __repr__(self) -> str:
        return f"AttentionTiming(seconds={self.seconds:.6f}, calls={self.calls})"


@contextlib.contextmanager
def attention_time(model: nn.Module, predicate: Optional[Callable[[nn.Module], bool]] = None
                   ) -> Iterator[AttentionTiming]:
    """Accumulate the time spent in the model's attention while the block runs.

    Models that expose ``set_attention_timer`` (the demo DiT) time exactly the attention call,
    including whatever a patcher routes it to (mask selection and the sparse kernel). Other
    models are timed per attention *module* through forward hooks (modules whose class name ends
    in "Attention", or those ``predicate`` selects), which also counts their projections.
    """
    timing = AttentionTiming()
    setter = getattr(model, "set_attention_timer", None)
    if setter is not None:
        setter(timing)
        try:
            yield timing
        finally:
            setter(None)
        return
    predicate = predicate or (lambda m: type(m).__name__.endswith("Attention"))
    starts: List[float] = []
    handles = []

    def pre(mod, args):
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        _sync(dev)
        starts.append(time.perf_counter())

    def post(mod, args, out):
        dev = out.device if isinstance(out, torch.Tensor) else None
        _sync(dev)
        timing.seconds += time.perf_counter() - starts.pop()
        timing.calls += 1

    for m in model.modules():
        if predicate(m):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        yield timing
    finally:
        for h in handles:
            h.remove()

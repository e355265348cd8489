"""Sparse-attention configurations for the demo's three mask rules, and calibration to a target
sparsity so the rules are compared at equal cost.

All knowledge of ``spattn.SparseAttentionConfig``'s fields lives in :func:`make_config`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..distill.trainer import handle_density

RULES = ("hybrid", "topk", "topp")


@dataclass
class MaskSetting:
    rule: str  # "hybrid" (Top-k union Top-p), "topk" or "topp"
    topk: float  # fraction of allowed key blocks kept by Top-k (0 disables)
    topp: float  # cumulative pooled-probability mass kept by Top-p (0 disables)
    block_q: int
    block_k: int

    def describe(self) -> str:
        if self.rule == "hybrid":
            return f"Top-k {self.topk:.3g} + Top-p {self.topp:.3g}"
        if self.rule == "topk":
            return f"Top-k {self.topk:.3g}"
        return f"Top-p {self.topp:.3g}"


def make_config(setting: MaskSetting) -> Any:
    """The ``spattn.SparseAttentionConfig`` for a setting (imported lazily)."""
    import spattn
    cls = getattr(spattn, "SparseAttentionConfig", None)
    if cls is None or not hasattr(spattn, "patch"):
        raise RuntimeError("the demo needs spattn.patch and spattn.SparseAttentionConfig; build "
                           "and install the package (pip install -e .) first")
    return cls(topk=setting.topk, topp=setting.topp, block_q=setting.block_q,
               block_k=setting.block_k)


def hybrid_config(topk: float = 0.03, topp: float = 0.2, block: int = 16) -> Any:
    return make_config(MaskSetting("hybrid", topk, topp, block, block))


def patch_fn() -> Callable[[nn.Module, Any], Any]:
    import spattn
    return spattn.patch


@torch.no_grad()
def measure_density(model: nn.Module, handle: Any, batches: List[Any],
                    forward: Callable[[nn.Module, Any], Any]) -> Optional[float]:
    """Mean attention density of a patched model over some forward passes."""
    values = []
    for b in batches:
        forward(model, b)
        d = handle_density(handle)
        if d is not None:
            values.append(d)
    return sum(values) / len(values) if values else None


def calibrate(teacher: nn.Module, setting: MaskSetting, param: str, lo: float, hi: float,
              target_density: float, batches: List[Any], forward: Callable[[nn.Module, Any], Any],
              patch: Callable[[nn.Module, Any], Any], iters: int = 10,
              build: Callable[[MaskSetting], Any] = make_config) -> Dict[str, Any]:
    """Largest ``param`` in [lo, hi] whose measured density on the teacher stays <= target.

    Density grows monotonically with both Top-k and Top-p, so bisection finds it; the result
    guarantees at least the target sparsity on the calibration inputs.
    """
    def density_at(value: float) -> float:
        trial = copy.copy(setting)
        setattr(trial, param, value)
        model = copy.deepcopy(teacher)
        handle = patch(model, build(trial))
        d = measure_density(model, handle, batches, forward)
        if d is None:
            raise RuntimeError("calibrate: the patch handle reports no density (last_density)")
        return d

    best_value, best_density = lo, density_at(lo)
    if best_density > target_density:
        return {"setting": _with(setting, param, lo), "density": best_density, "met": False}
    low, high = lo, hi
    for _ in range(iters):
        mid = 0.5 * (low + high)
        d = density_at(mid)
        if d <= target_density:
            best_value, best_density, low = mid, d, mid
        else:
            high = mid
    return {"setting": _with(setting, param, best_value), "density": best_density, "met": True}


def _with(setting: MaskSetting, param: str, value: float) -> MaskSetting:
    out = copy.copy(setting)
    setattr(out, param, value)
    return out

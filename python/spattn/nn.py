"""spattn.nn.SparseAttention: an nn.Module that selects a plan from q and k on every call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._C import SpattnError
from .config import SparseAttentionConfig
from .functional import attention
from .plan import Window
from .select import from_config

__all__ = ["SparseAttention", "SparseAttentionConfig"]


class SparseAttention(nn.Module):
    """Hybrid Top-k ∪ Top-p sparse attention over (B, H, N, D) q, k, v.

    The plan is rebuilt from the current q and k on every call (the selection is not
    differentiated; gradients flow to q, k and v through the attention). ``last_plan`` and
    ``last_density`` describe the most recent call. The module has no parameters: put it where
    a model calls ``scaled_dot_product_attention``."""

    def __init__(self, config: Optional[SparseAttentionConfig] = None, *, causal: bool = False,
                 window: Window = None, scale: Optional[float] = None):
        super().__init__()
        if config is None:
            config = SparseAttentionConfig()
        if not isinstance(config, SparseAttentionConfig):
            raise SpattnError(f"SparseAttention: config must be a spattn.SparseAttentionConfig; "
                              f"got {type(config).__name__}")
        self.config = config
        self.causal = causal
        self.window = window
        self.scale = scale
        self.last_plan = None
        # Kept as a tensor so forward never synchronises; last_density converts on read.
        self._last_density: Optional[Tensor] = None

    @property
    def last_density(self) -> Optional[float]:
        """Share of the block grid computed by the last call (None before the first call)."""
        return None if self._last_density is None else float(self._last_density)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        plan = from_config(q, k, self.config, causal=self.causal, window=self.window,
                           scale=self.scale)
        self.last_plan = plan
        self._last_density = plan.density_tensor()
        return attention(q, k, v, plan, scale=self.scale)

    def extra_repr(self) -> str:
        c = self.config
        return (f"topk={c.topk}, topp={c.topp}, blocks=({c.block_q}, {c.block_k}), "
                f"sinks={c.sinks}, local={c.local}, gqa_mode={c.gqa_mode!r}, "
                f"causal={self.causal}, window={self.window}")

"""The selector configuration shared by spattn.nn.SparseAttention, spattn.patch and friends."""

from __future__ import annotations

from dataclasses import dataclass

from ._C import SpattnError

__all__ = ["SparseAttentionConfig"]

_GQA_MODES = ("per_head", "group_mean", "group_max")


@dataclass
class SparseAttentionConfig:
    """Hybrid Top-k ∪ Top-p selection (SpargeAttention2), rebuilt from q and k on every call.

    topk:    fraction of the allowed kv blocks each query-block row keeps by score (0 = off).
    topp:    smallest set of top blocks whose pooled-softmax mass reaches this share (0 = off).
    block_q, block_k: tile sizes, powers of two in [16, 256].
    sinks:   the first ``sinks`` kv blocks are always kept (attention sinks).
    local:   kv blocks within ``local`` blocks of the diagonal are always kept; 0 = no band.
    gqa_mode: "per_head" (one plan per query head), "group_mean" or "group_max" (one plan per
             kv head, from the mean or max of the group's block distributions).
    """

    topk: float = 0.03
    topp: float = 0.2
    block_q: int = 128
    block_k: int = 64
    sinks: int = 0
    local: int = 0
    gqa_mode: str = "per_head"

    def __post_init__(self):
        where = "SparseAttentionConfig"
        for name in ("topk", "topp"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise SpattnError(f"{where}: {name} must be a number in [0, 1]; got {value!r}")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 16 <= value <= 256 or value & (value - 1):
                raise SpattnError(f"{where}: {name} must be a power of two in [16, 256]; got "
                                  f"{value!r}")
        for name in ("sinks", "local"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SpattnError(f"{where}: {name} must be an int >= 0; got {value!r}")
        if self.gqa_mode not in _GQA_MODES:
            raise SpattnError(f"{where}: gqa_mode must be one of {_GQA_MODES}; got "
                              f"{self.gqa_mode!r}")

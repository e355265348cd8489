"""BlockPlan: which (query block, key block) tiles attention computes.

The plan is three int32 tensors in the layout the kernels read, on the device that runs the
attention, plus the geometry (lengths, block sizes, element rule):

    kv_index    (batch, heads, num_q_blocks, capacity)  per row: full tiles, then partial tiles
    num_full    (batch, heads, num_q_blocks)
    num_partial (batch, heads, num_q_blocks)

``batch`` is 1 (broadcast) or B; ``heads`` is 1 (broadcast), Hkv (one plan per GQA group) or Hq.
Host plans are built and validated by the C++ ``BlockPlan``; statistics and ``to_dense`` are
plain tensor arithmetic, so they also work for plans on a GPU (reading a float off a GPU plan,
as ``density`` does, synchronises).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import _C
from ._C import SpattnError

__all__ = ["BlockPlan", "normalize_window"]

Window = Union[None, int, Tuple[Optional[int], Optional[int]]]


def normalize_window(window: Window, causal: bool, where: str = "window") -> Tuple[int, int]:
    """(left, right) token counts of a sliding window, -1 meaning unbounded.

    ``None`` is no window; an int ``w`` is ``w`` tokens each side (``(w, 0)`` when causal, since
    a causal query sees nothing to its right anyway); a pair is ``(left, right)`` with ``None``
    for unbounded."""
    if window is None:
        return -1, -1
    if isinstance(window, bool):
        raise SpattnError(f"{where}: window must be None, an int or a (left, right) pair; got {window!r}")
    if isinstance(window, int):
        if window < 0:
            raise SpattnError(f"{where}: window must be >= 0 tokens; got {window}")
        return window, (0 if causal else window)
    if isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = (-1 if w is None else w for w in window)
        for name, w in (("left", left), ("right", right)):
            if not isinstance(w, int) or isinstance(w, bool) or w < -1:
                raise SpattnError(
                    f"{where}: window {name} must be an int >= 0 or None (unbounded); got {w!r}")
        return int(left), int(right)
    raise SpattnError(f"{where}: window must be None, an int or a (left, right) pair; got {window!r}")


def _window_tuple(left: int, right: int) -> Optional[Tuple[Optional[int], Optional[int]]]:
    if left < 0 and right < 0:
        return None
    return (None if left < 0 else left, None if right < 0 else right)


def _check_block(name: str, value: int, where: str) -> int:
    if not isinstance(value, int) or value < 16 or value > 256 or value & (value - 1):
        raise SpattnError(f"{where}: {name} must be a power of two in [16, 256]; got {value!r}")
    return value


class BlockPlan:
    """A block-sparse attention plan (see the module docstring for the layout).

    Build one with :meth:`from_dense`, :meth:`dense`, a selector in :mod:`spattn.select`, or
    from your own int32 tensors (host plans are validated on construction)."""

    def __init__(
        self,
        kv_index: Tensor,
        num_full: Tensor,
        num_partial: Tensor,
        *,
        q_len: int,
        k_len: int,
        block_q: int = 128,
        block_k: int = 64,
        causal: bool = False,
        window: Window = None,
        validate: bool = True,
    ):
        where = "BlockPlan"
        for name, t, rank in (("kv_index", kv_index, 4), ("num_full", num_full, 3),
                              ("num_partial", num_partial, 3)):
            if not isinstance(t, Tensor):
                raise SpattnError(f"{where}: {name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise SpattnError(f"{where}: {name} must have dtype torch.int32; got {t.dtype}")
            if t.dim() != rank:
                raise SpattnError(f"{where}: {name} must have rank {rank}; got shape {tuple(t.shape)}")
            if t.device != kv_index.device:
                raise SpattnError(
                    f"{where}: {name} must be on kv_index's device {kv_index.device}; got {t.device}")
        if tuple(num_full.shape) != tuple(kv_index.shape[:3]) or num_partial.shape != num_full.shape:
            raise SpattnError(
                f"{where}: num_full and num_partial must have shape {tuple(kv_index.shape[:3])} "
                f"(kv_index's first three dims); got {tuple(num_full.shape)} and "
                f"{tuple(num_partial.shape)}")
        self.kv_index = kv_index.contiguous()
        self.num_full = num_full.contiguous()
        self.num_partial = num_partial.contiguous()
        self.q_len = int(q_len)
        self.k_len = int(k_len)
        self.block_q = _check_block("block_q", block_q, where)
        self.block_k = _check_block("block_k", block_k, where)
        self.causal = bool(causal)
        self.window_left, self.window_right = normalize_window(window, self.causal, where)
        nqb = -(-self.q_len // self.block_q)
        if kv_index.shape[2] != nqb:
            raise SpattnError(
                f"{where}: kv_index.shape[2] must be num_q_blocks = ceil({self.q_len} / "
                f"{self.block_q}) = {nqb}; got {kv_index.shape[2]}")
        # Contents are checked in C++ for host plans, and never read for device plans (that
        # would synchronise). Traced (fake) tensors have no contents to check.
        if validate and self.kv_index.device.type == "cpu" and not _tracing():
            _C.validate_plan(self.kv_index, self.num_full, self.num_partial, self.q_len,
                             self.k_len, self.block_q, self.block_k, self.causal,
                             self.window_left, self.window_right)

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.kv_index.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_index.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_index.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return -(-self.k_len // self.block_k)

    @property
    def capacity(self) -> int:
        return self.kv_index.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_index.device

    @property
    def window(self) -> Optional[Tuple[Optional[int], Optional[int]]]:
        """(left, right) token counts, None for unbounded; None when there is no window."""
        return _window_tuple(self.window_left, self.window_right)

    @property
    def rule(self) -> Tuple[bool, int, int]:
        """(causal, window_left, window_right) with -1 = unbounded, as the ops take it."""
        return self.causal, self.window_left, self.window_right

    def _geometry_kwargs(self) -> dict:
        return dict(q_len=self.q_len, k_len=self.k_len, block_q=self.block_q,
                    block_k=self.block_k, causal=self.causal, window=self.window)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def _from_arrays(cls, arrays, *, q_len: int, k_len: int, block_q: int, block_k: int,
                     device=None) -> "BlockPlan":
        # arrays: (kv_index, num_full, num_partial, (causal, left, right)) from _C; the NumPy
        # arrays own their memory and torch.from_numpy shares it.
        kv_index, num_full, num_partial, (causal, left, right) = arrays
        tensors = [torch.from_numpy(np.asarray(a)) for a in (kv_index, num_full, num_partial)]
        if device is not None and torch.device(device).type != "cpu":
            tensors = [t.to(device) for t in tensors]
        return cls(*tensors, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                   causal=causal, window=_window_tuple(left, right), validate=False)

    @classmethod
    def dense(cls, q_len: int, k_len: Optional[int] = None, *, batch: int = 1, heads: int = 1,
              block_q: int = 128, block_k: int = 64, causal: bool = False, window: Window = None,
              device=None) -> "BlockPlan":
        """Every tile the rule (causal, window) leaves non-empty: dense attention as a plan."""
        k_len = q_len if k_len is None else k_len
        left, right = normalize_window(window, causal, "BlockPlan.dense")
        arrays = _C.plan_dense(batch, heads, q_len, k_len, block_q, block_k, causal, left, right)
        return cls._from_arrays(arrays, q_len=q_len, k_len=k_len, block_q=block_q,
                                block_k=block_k, device=device)

    @classmethod
    def from_dense(cls, mask, *, q_len: int, k_len: Optional[int] = None, block_q: int = 128,
                   block_k: int = 64, causal: bool = False, window: Window = None,
                   device=None) -> "BlockPlan":
        """A plan from a boolean block map (batch, heads, num_q_blocks, num_k_blocks), or
        (num_q_blocks, num_k_blocks) for one map shared by every batch and head.

        ``mask`` may be a torch tensor (any device) or a NumPy array; True keeps the tile.
        Tiles the rule leaves empty are dropped; the rest are classified full/partial. The plan
        lands on ``device`` (default: the mask's device)."""
        where = "BlockPlan.from_dense"
        k_len = q_len if k_len is None else k_len
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, Tensor):
            raise SpattnError(f"{where}: mask must be a torch.Tensor or numpy.ndarray; got "
                              f"{type(mask).__name__}")
        if device is None:
            device = mask.device
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise SpattnError(f"{where}: mask must have rank 2 or 4 (batch, heads, num_q_blocks, "
                              f"num_k_blocks); got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and mask.dtype != torch.uint8:
            raise SpattnError(f"{where}: mask must have dtype torch.bool or torch.uint8; got "
                              f"{mask.dtype}")
        left, right = normalize_window(window, causal, where)
        host = mask.detach().to("cpu", torch.uint8)
        arrays = _C.plan_from_block_mask(host, q_len, k_len, block_q, block_k, causal, left,
                                         right)
        return cls._from_arrays(arrays, q_len=q_len, k_len=k_len, block_q=block_q,
                                block_k=block_k, device=device)

    def to(self, device, non_blocking: bool = False) -> "BlockPlan":
        """The same plan with its arrays on ``device``."""
        if torch.device(device) == self.device:
            return self
        arrays = [t.to(device, non_blocking=non_blocking)
                  for t in (self.kv_index, self.num_full, self.num_partial)]
        return BlockPlan(*arrays, validate=False, **self._geometry_kwargs())

    def cpu(self) -> "BlockPlan":
        return self.to("cpu")

    def cuda(self, device=None) -> "BlockPlan":
        if device is None:
            device = torch.device("cuda")
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device)

    def _host_args(self) -> tuple:
        # The ten values the C++ plan helpers take (convert.hpp: unpack_plan).
        host = [t.detach().cpu() for t in (self.kv_index, self.num_full, self.num_partial)]
        return (*host, self.q_len, self.k_len, self.block_q, self.block_k, self.causal,
                self.window_left, self.window_right)

    # ---- views and statistics -----------------------------------------------------------------
    def tiles_per_row(self) -> Tensor:
        """(batch, heads, num_q_blocks) int32: listed tiles per row."""
        return self.num_full + self.num_partial

    def to_dense(self) -> Tensor:
        """(batch, heads, num_q_blocks, num_k_blocks) bool block map on the plan's device."""
        nkb = self.num_k_blocks
        slots = torch.arange(self.capacity, device=self.device)
        listed = slots < self.tiles_per_row().unsqueeze(-1)
        # Unused slots scatter into an extra column that is dropped, so no compaction is needed.
        index = torch.where(listed, self.kv_index.long(), nkb)
        dense = torch.zeros(*self.kv_index.shape[:3], nkb + 1, dtype=torch.bool,
                            device=self.device)
        dense.scatter_(-1, index, True)
        return dense[..., :nkb]

    def density_tensor(self) -> Tensor:
        """Listed tiles / (rows x num_k_blocks) as a 0-dim float32 tensor (no synchronisation)."""
        grid = self.batch * self.heads * self.num_q_blocks * self.num_k_blocks
        return self.tiles_per_row().sum(dtype=torch.float32) / max(grid, 1)

    @property
    def density(self) -> float:
        """Share of the block grid that is computed (the C++ BlockPlan::density)."""
        return float(self.density_tensor())

    def head_density(self) -> Tensor:
        """(heads,) float32: per plan head, listed tiles / (batch x rows x num_k_blocks)."""
        per_head = self.tiles_per_row().sum(dim=(0, 2), dtype=torch.float32)
        return per_head / max(self.batch * self.num_q_blocks * self.num_k_blocks, 1)

    def stats(self) -> dict:
        """Counts and densities from the C++ plan statistics (copies a device plan to the host):
        tiles, allowed_tiles, grid_tiles, density, allowed_density (1 for a dense plan under
        the rule), full_tiles, partial_tiles, head_density, head_allowed_density."""
        if not _C.has_select:
            raise SpattnError("BlockPlan.stats: this build of spattn has no selector library")
        return _C.plan_stats(self._host_args())

    # ---- algebra -------------------------------------------------------------------------------
    def _combine(self, other: "BlockPlan", fn, name: str) -> "BlockPlan":
        if not isinstance(other, BlockPlan):
            raise SpattnError(f"BlockPlan.{name}: other must be a BlockPlan; got {type(other).__name__}")
        arrays = fn(self._host_args(), other._host_args())
        return BlockPlan._from_arrays(arrays, q_len=self.q_len, k_len=self.k_len,
                                      block_q=self.block_q, block_k=self.block_k,
                                      device=self.device)

    def union(self, other: "BlockPlan") -> "BlockPlan":
        return self._combine(other, _C.plan_union, "union")

    def intersection(self, other: "BlockPlan") -> "BlockPlan":
        return self._combine(other, _C.plan_intersection, "intersection")

    def difference(self, other: "BlockPlan") -> "BlockPlan":
        return self._combine(other, _C.plan_difference, "difference")

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    # ---- pictures ------------------------------------------------------------------------------
    def render(self, batch: int = 0, head: int = -1, size: int = 768) -> np.ndarray:
        """(height, width, 3) uint8 picture from the C++ renderer: full tiles dark blue, partial
        light blue, skipped-but-allowed white, forbidden grey; head=-1 draws every head."""
        if not hasattr(_C, "render_plan"):
            raise SpattnError("BlockPlan.render: this build of spattn has no plan renderer")
        return np.asarray(_C.render_plan(self._host_args(), batch, head, size))

    def save_png(self, path, batch: int = 0, head: int = -1, size: int = 768) -> None:
        """Writes :meth:`render` to ``path`` as PNG (encoded with Pillow)."""
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SpattnError("BlockPlan.save_png: needs Pillow (pip install pillow)") from e
        Image.fromarray(self.render(batch, head, size), mode="RGB").save(path, format="PNG")

    def __repr__(self) -> str:
        rule = "causal" if self.causal else "non-causal"
        if self.window is not None:
            rule += f", window={self.window}"
        return (f"BlockPlan(batch={self.batch}, heads={self.heads}, q_len={self.q_len}, "
                f"k_len={self.k_len}, blocks=({self.block_q}, {self.block_k}), {rule}, "
                f"device={self.device})")


def _tracing() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False

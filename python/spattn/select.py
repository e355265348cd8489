"""Plan builders: the hybrid Top-k ∪ Top-p selector and the classic static patterns.

Every function here calls the C++ selector library (include/spattn/select.hpp,
patterns.hpp); docs/selectors.md states each rule exactly. ``hybrid`` runs where q and k live:
on a GPU it pools, scores and selects on the current stream without host synchronisation, so
selection and attention together can be captured in a CUDA graph. The static patterns, block
scores and the tuner run on the host.

``hybrid`` is a torch custom op (``torch.ops.spattn.select_hybrid``) with a fake
implementation, so models that rebuild their plan on every call still compile with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import _C
from ._C import SpattnError
from ._ops import _device_guard, _stream, _threads, _unit_last_stride
from .config import SparseAttentionConfig
from .functional import _check_scale
from .plan import BlockPlan, Window, normalize_window

__all__ = [
    "hybrid", "from_config", "block_scores", "tune", "causal", "sliding_window", "mistral",
    "dilated_window", "strided", "fixed", "longformer", "bigbird", "document", "video_window",
]

Fraction = Union[float, Sequence[float]]


def _require_select(where: str) -> None:
    if not _C.has_select:
        raise SpattnError(f"{where}: this build of spattn has no selector library")


def _fractions(where: str, name: str, value: Fraction) -> List[float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    try:
        return [float(x) for x in values]
    except (TypeError, ValueError):
        raise SpattnError(f"{where}: {name} must be a number or a sequence of numbers (one per "
                          f"plan head); got {value!r}") from None


def _local_blocks(where: str, local: int) -> int:
    # 0 means "no band" in the Python API; the C++ option uses -1 for that and 0 for the
    # diagonal blocks alone.
    if not isinstance(local, int) or local < 0:
        raise SpattnError(f"{where}: local must be an int >= 0 (0 = no band); got {local!r}")
    return local if local > 0 else -1


def _plan_heads(q: Tensor, k: Tensor, gqa: str) -> int:
    return q.shape[1] if gqa == "per_head" else k.shape[1]


def _num_blocks(n, block: int):
    return (n + block - 1) // block


# ---- the hybrid selector as a custom op ---------------------------------------------------------

@torch.library.custom_op("spattn::select_hybrid", mutates_args=())
def _select_hybrid(
    q: Tensor,
    k: Tensor,
    top_k: List[float],
    top_p: List[float],
    scale: float,
    block_q: int,
    block_k: int,
    causal: bool,
    window_left: int,
    window_right: int,
    sink_blocks: int,
    local_blocks: int,
    gqa: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    # Outputs are allocated by torch where q lives; the C++ selector fills them (on a GPU,
    # stream-ordered on the current stream without host synchronisation).
    b, heads = q.shape[0], _plan_heads(q, k, gqa)
    nqb, nkb = _num_blocks(q.shape[2], block_q), _num_blocks(k.shape[2], block_k)
    kv_index = q.new_empty((b, heads, nqb, max(nkb, 1)), dtype=torch.int32)
    num_full = q.new_empty((b, heads, nqb), dtype=torch.int32)
    num_partial = q.new_empty((b, heads, nqb), dtype=torch.int32)
    with _device_guard(q):
        _C.select_hybrid_into(
            _unit_last_stride(q.detach()), _unit_last_stride(k.detach()), kv_index, num_full,
            num_partial, top_k, top_p, scale, block_q, block_k, causal, window_left,
            window_right, sink_blocks, local_blocks, gqa, _threads(q), _stream(q))
    return kv_index, num_full, num_partial


@_select_hybrid.register_fake
def _(q, k, top_k, top_p, scale, block_q, block_k, causal, window_left, window_right,
      sink_blocks, local_blocks, gqa):
    # Shapes follow the C++ BlockPlan: capacity = max(num_k_blocks, 1).
    b, heads = q.shape[0], _plan_heads(q, k, gqa)
    nqb, nkb = _num_blocks(q.shape[2], block_q), _num_blocks(k.shape[2], block_k)
    kv_index = q.new_empty((b, heads, nqb, max(nkb, 1)), dtype=torch.int32)
    return kv_index, q.new_empty((b, heads, nqb), dtype=torch.int32), \
        q.new_empty((b, heads, nqb), dtype=torch.int32)


def hybrid(
    q: Tensor,
    k: Tensor,
    *,
    topk: Fraction = 0.03,
    topp: Fraction = 0.2,
    block_q: int = 128,
    block_k: int = 64,
    causal: bool = False,
    window: Window = None,
    scale: Optional[float] = None,
    sinks: int = 0,
    local: int = 0,
    gqa_mode: str = "per_head",
) -> BlockPlan:
    """SpargeAttention2's hybrid rule: per (batch, plan head, query block), the union of the
    Top-k (``topk`` share of allowed kv blocks) and Top-p (``topp`` of the pooled softmax mass)
    sets over mean-pooled block scores, plus ``sinks`` first blocks and a ``local`` band.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D). ``topk``/``topp`` are one value or one per plan head.
    ``gqa_mode``: "per_head" (plan heads = Hq), "group_mean" / "group_max" (plan heads = Hkv).
    The plan is built under the rule (causal, window) and lands on q's device; it is not
    differentiated."""
    where = "spattn.select.hybrid"
    _require_select(where)
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise SpattnError(f"{where}: {name} must be a rank-4 torch.Tensor (B, H, N, D); got "
                              f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if k.device != q.device:
        raise SpattnError(f"{where}: k must be on q's device {q.device}; got {k.device}")
    if gqa_mode not in ("per_head", "group_mean", "group_max"):
        raise SpattnError(f"{where}: gqa_mode must be 'per_head', 'group_mean' or 'group_max'; "
                          f"got {gqa_mode!r}")
    left, right = normalize_window(window, causal, where)
    kv_index, num_full, num_partial = torch.ops.spattn.select_hybrid(
        q, k, _fractions(where, "topk", topk), _fractions(where, "topp", topp),
        _check_scale(where, scale), block_q, block_k, bool(causal), left, right, int(sinks),
        _local_blocks(where, local), gqa_mode)
    return BlockPlan(kv_index, num_full, num_partial, q_len=q.shape[2], k_len=k.shape[2],
                     block_q=block_q, block_k=block_k, causal=causal, window=window,
                     validate=False)


def from_config(q: Tensor, k: Tensor, config: SparseAttentionConfig, *, causal: bool = False,
                window: Window = None, scale: Optional[float] = None) -> BlockPlan:
    """``hybrid`` with the settings of a :class:`spattn.SparseAttentionConfig`."""
    if not isinstance(config, SparseAttentionConfig):
        raise SpattnError(f"spattn.select.from_config: config must be a "
                          f"spattn.SparseAttentionConfig; got {type(config).__name__}")
    return hybrid(q, k, topk=config.topk, topp=config.topp, block_q=config.block_q,
                  block_k=config.block_k, causal=causal, window=window, scale=scale,
                  sinks=config.sinks, local=config.local, gqa_mode=config.gqa_mode)


def block_scores(q: Tensor, k: Tensor, *, block_q: int = 128, block_k: int = 64,
                 causal: bool = False, window: Window = None, scale: Optional[float] = None,
                 gqa_mode: str = "per_head") -> Tensor:
    """The pooled block distributions the hybrid rule ranks, (B, plan heads, nqb, nkb) float32
    on the host; tiles the rule forbids hold -1."""
    where = "spattn.select.block_scores"
    _require_select(where)
    left, right = normalize_window(window, causal, where)
    scores = _C.hybrid_block_scores(q.detach().cpu(), k.detach().cpu(), [0.0], [0.0],
                                    _check_scale(where, scale), block_q, block_k, causal, left,
                                    right, 0, -1, gqa_mode, torch.get_num_threads())
    return torch.from_numpy(np.asarray(scores))


def tune(q: Tensor, k: Tensor, v: Tensor, *, target: float = 0.05, metric: str = "rel_l1",
         block_q: int = 128, block_k: int = 64, causal: bool = False, window: Window = None,
         scale: Optional[float] = None, sinks: int = 0, local: int = 0,
         k_grid: Sequence[float] = (), steps: int = 8) -> dict:
    """Per query head, the sparsest (topk, topp) meeting ``target`` on calibration q, k, v
    (``metric`` "rel_l1": output error <= target; "recall": softmax mass kept >= target).

    Returns {"topk": [...], "topp": [...], "quality": {...}, "plan": BlockPlan, "evaluations",
    "seconds"}; pass topk/topp to :func:`hybrid` (they are per query head)."""
    where = "spattn.select.tune"
    if not hasattr(_C, "tune_hybrid"):
        raise SpattnError(f"{where}: this build of spattn has no tuner")
    left, right = normalize_window(window, causal, where)
    r = _C.tune_hybrid(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), metric,
                       float(target), _check_scale(where, scale), block_q, block_k, causal,
                       left, right, sinks, _local_blocks(where, local),
                       [float(x) for x in k_grid], steps)
    plan = BlockPlan._from_arrays(r["plan"], q_len=q.shape[2], k_len=k.shape[2],
                                  block_q=block_q, block_k=block_k, device=q.device)
    return {"topk": r["top_k"], "topp": r["top_p"], "quality": r["quality"], "plan": plan,
            "evaluations": r["evaluations"], "seconds": r["seconds"]}


# ---- static patterns ----------------------------------------------------------------------------

def _geo(where, q_len, k_len, batch, heads, block_q, block_k, causal, window):
    _require_select(where)
    k_len = q_len if k_len is None else k_len
    left, right = normalize_window(window, causal, where)
    return (batch, heads, q_len, k_len, block_q, block_k, causal, left, right), k_len


def _pattern(fn, where, q_len, k_len, batch, heads, block_q, block_k, causal, window, device,
             *args) -> BlockPlan:
    geo, k_len = _geo(where, q_len, k_len, batch, heads, block_q, block_k, causal, window)
    return BlockPlan._from_arrays(fn(geo, *args), q_len=q_len, k_len=k_len, block_q=block_q,
                                  block_k=block_k, device=device)


_GEO_DOC = """
    Geometry keywords (all patterns): k_len (default q_len), batch=1, heads=1 (broadcast),
    block_q=128, block_k=64, causal, window (a rule the pattern is intersected with), device.
    The returned plan carries the rule it was built with; attention applies it."""


def causal(q_len, k_len=None, *, batch=1, heads=1, block_q=128, block_k=64, window=None,
           device=None) -> BlockPlan:
    """Dense causal attention as a plan (bottom-right aligned)."""
    return _pattern(_C.pattern_causal, "spattn.select.causal", q_len, k_len, batch, heads,
                    block_q, block_k, False, window, device)


def sliding_window(q_len, left, right=0, k_len=None, *, batch=1, heads=1, block_q=128,
                   block_k=64, causal=False, window=None, device=None) -> BlockPlan:
    """Tokens at offsets [-left, right] (None = unbounded), exact at element level."""
    return _pattern(_C.pattern_sliding_window, "spattn.select.sliding_window", q_len, k_len,
                    batch, heads, block_q, block_k, causal, window, device,
                    -1 if left is None else left, -1 if right is None else right)


def mistral(q_len, window_size=4096, k_len=None, *, batch=1, heads=1, block_q=128, block_k=64,
            device=None) -> BlockPlan:
    """Causal, each query sees itself and the ``window_size - 1`` keys before it."""
    return _pattern(_C.pattern_mistral, "spattn.select.mistral", q_len, k_len, batch, heads,
                    block_q, block_k, False, None, device, window_size)


def dilated_window(q_len, left, right, dilation, k_len=None, *, batch=1, heads=1, block_q=128,
                   block_k=64, causal=False, window=None, device=None) -> BlockPlan:
    """Offsets m * dilation for m in [-left, right], coarsened to tiles."""
    return _pattern(_C.pattern_dilated_window, "spattn.select.dilated_window", q_len, k_len,
                    batch, heads, block_q, block_k, causal, window, device, left, right,
                    dilation)


def strided(q_len, stride, part="both", k_len=None, *, batch=1, heads=1, block_q=128,
            block_k=64, causal=True, window=None, device=None) -> BlockPlan:
    """Sparse Transformer, strided: part "local" (offsets (-stride, 0]), "summary" (multiples
    of stride) or "both"."""
    return _pattern(_C.pattern_strided, "spattn.select.strided", q_len, k_len, batch, heads,
                    block_q, block_k, False, window, device, stride, part, causal)


def fixed(q_len, segment, summary, part="both", k_len=None, *, batch=1, heads=1, block_q=128,
          block_k=64, causal=True, window=None, device=None) -> BlockPlan:
    """Sparse Transformer, fixed: own segment ("local") and the last ``summary`` keys of every
    segment ("summary")."""
    return _pattern(_C.pattern_fixed, "spattn.select.fixed", q_len, k_len, batch, heads,
                    block_q, block_k, False, window, device, segment, summary, part, causal)


def longformer(q_len, left=256, right=256, dilation=1, global_tokens=(), k_len=None, *,
               batch=1, heads=1, block_q=128, block_k=64, causal=False, window=None,
               device=None) -> BlockPlan:
    """Longformer: dilated window plus global tokens (attend and are attended by everything)."""
    return _pattern(_C.pattern_longformer, "spattn.select.longformer", q_len, k_len, batch,
                    heads, block_q, block_k, causal, window, device, left, right, dilation,
                    [int(g) for g in global_tokens])


def bigbird(q_len, window_blocks=3, global_blocks=2, random_blocks=3, seed=0, k_len=None, *,
            batch=1, heads=1, block_q=128, block_k=64, causal=False, window=None,
            device=None) -> BlockPlan:
    """BigBird at block level: diagonal band, global blocks and seeded random blocks (which
    differ per batch and head)."""
    return _pattern(_C.pattern_bigbird, "spattn.select.bigbird", q_len, k_len, batch, heads,
                    block_q, block_k, causal, window, device, window_blocks, global_blocks,
                    random_blocks, seed)


def document(cu_seqlens, *, batch=1, heads=1, block_q=128, block_k=64, causal=False,
             window=None, device=None) -> BlockPlan:
    """Packed documents {0, n1, n1+n2, ..., total}: tiles holding same-document pairs. Tiles
    straddling a boundary are computed whole (see docs/selectors.md)."""
    cu = [int(x) for x in cu_seqlens]
    total = cu[-1] if cu else 0
    return _pattern(_C.pattern_document, "spattn.select.document", total, total, batch, heads,
                    block_q, block_k, causal, window, device, cu)


def video_window(frames, height, width, radius_t=1, radius_h=1, radius_w=1, *, batch=1,
                 heads=1, block_q=128, block_k=64, causal=False, window=None,
                 device=None) -> BlockPlan:
    """Video tokens in (T, H, W) raster order attending a 3-D neighbourhood (radii in tokens,
    -1 = the whole axis)."""
    n = frames * height * width
    return _pattern(_C.pattern_video_window, "spattn.select.video_window", n, n, batch, heads,
                    block_q, block_k, causal, window, device, frames, height, width, radius_t,
                    radius_h, radius_w)


for _f in (causal, sliding_window, mistral, dilated_window, strided, fixed, longformer, bigbird,
           document, video_window):
    _f.__doc__ = (_f.__doc__ or "") + _GEO_DOC
del _f

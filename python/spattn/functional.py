"""Attention entry points: ``attention`` (spattn's own signature) and ``sdpa`` (SDPA's)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers torch.ops.spattn.*)
from ._C import SpattnError
from .plan import BlockPlan, Window, normalize_window

__all__ = ["attention", "sdpa"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _unit_last_stride(t: Tensor) -> Tensor:
    # Kernels read each (b, h, n) row of D elements as one run; any other stride is free.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_qkv(where: str, q, k, v) -> None:
    # Metadata-only checks (shapes, dtypes, devices): cheap, trace-friendly, and they name the
    # argument. The C++ entry points check everything again.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise SpattnError(f"{where}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise SpattnError(f"{where}: {name} must have rank 4 (batch, heads, tokens, head_dim);"
                              f" got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise SpattnError(f"{where}: q must have dtype float32, bfloat16, float16 or float64; "
                          f"got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise SpattnError(f"{where}: {name} must have q's dtype {q.dtype}; got {t.dtype}")
        if t.device != q.device:
            raise SpattnError(f"{where}: {name} must be on q's device {q.device}; got {t.device}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise SpattnError(f"{where}: k and v must have q's batch {b}; got {k.shape[0]} and "
                          f"{v.shape[0]}")
    if k.shape[3] != d:
        raise SpattnError(f"{where}: k.shape[3] (head dim) must equal q's {d}; got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise SpattnError(f"{where}: v must have k's heads and length {tuple(k.shape[1:3])}; got "
                          f"{tuple(v.shape[1:3])}")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise SpattnError(f"{where}: q heads must be a multiple of k heads (GQA); got q heads "
                          f"{hq}, k heads {hkv}")


def _check_plan(where: str, plan, q: Tensor, k: Tensor) -> None:
    if not isinstance(plan, BlockPlan):
        raise SpattnError(f"{where}: plan must be a spattn.BlockPlan or None; got "
                          f"{type(plan).__name__}")
    if plan.device != q.device:
        raise SpattnError(f"{where}: plan must be on q's device {q.device}; got {plan.device} "
                          f"(use plan.to(q.device))")
    if plan.q_len != q.shape[2] or plan.k_len != k.shape[2]:
        raise SpattnError(f"{where}: plan lengths must match q and k ({q.shape[2]}, "
                          f"{k.shape[2]}); got plan q_len={plan.q_len}, k_len={plan.k_len}")
    if plan.batch not in (1, q.shape[0]):
        raise SpattnError(f"{where}: plan batch must be 1 or {q.shape[0]}; got {plan.batch}")
    if plan.heads not in (1, k.shape[1], q.shape[1]):
        raise SpattnError(f"{where}: plan heads must be 1, the k heads ({k.shape[1]}) or the q "
                          f"heads ({q.shape[1]}); got {plan.heads}")


def _check_scale(where: str, scale) -> float:
    # The C++ API reads 0 as "1/sqrt(D)"; an explicit scale must therefore be positive.
    if scale is None:
        return 0.0
    scale = float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise SpattnError(f"{where}: scale must be a finite number > 0 or None (1/sqrt(D)); "
                          f"got {scale}")
    return scale


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: Optional[BlockPlan] = None,
    *,
    causal: bool = False,
    window: Window = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Block-sparse attention in SDPA layout.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides; Hq a multiple of Hkv
    (GQA/MQA by head counts). ``plan`` lists the tiles to compute; None is dense attention
    under ``causal`` / ``window``. With a plan, the plan's rule applies: ``causal=True`` or a
    ``window`` must agree with it. For Nq != Nk the causal diagonal is aligned bottom-right
    (query i sits at key position i + Nk - Nq), as in FlashAttention-2.

    Returns out (B, Hq, Nq, Dv) in q's dtype, and with ``return_lse`` also the natural-log
    softmax normaliser lse (B, Hq, Nq), float32 (float64 for float64 inputs). Rows that see no
    key give out = 0 and lse = -inf. Differentiable in q, k and v.
    """
    where = "spattn.attention"
    _check_qkv(where, q, k, v)
    scale_value = _check_scale(where, scale)
    if plan is None:
        left, right = normalize_window(window, causal, where)
        arrays = (None, None, None)
        block_q, block_k = 128, 64
    else:
        _check_plan(where, plan, q, k)
        if causal and not plan.causal:
            raise SpattnError(f"{where}: causal=True but the plan was built without the causal "
                              f"rule; build the plan with causal=True")
        if window is not None and normalize_window(window, plan.causal, where) != (
                plan.window_left, plan.window_right):
            raise SpattnError(f"{where}: window must match the plan's window {plan.window}; got "
                              f"{window!r}")
        left, right = plan.window_left, plan.window_right
        causal = plan.causal
        arrays = (plan.kv_index, plan.num_full, plan.num_partial)
        block_q, block_k = plan.block_q, plan.block_k
    out, lse = torch.ops.spattn.forward(
        _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), *arrays,
        block_q, block_k, scale_value, bool(causal), left, right)
    return (out, lse) if return_lse else out


def _sdpa_args(where: str, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Checks the SDPA arguments spattn cannot honour and returns 4-D (query, key, value) plus
    whether a leading batch dimension was added."""
    if attn_mask is not None:
        desc = (f"a tensor of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype}"
                if isinstance(attn_mask, Tensor) else type(attn_mask).__name__)
        raise SpattnError(
            f"{where}: attn_mask is not supported (spattn takes a block plan plus a causal or "
            f"sliding-window rule, not an element mask); got {desc}. Use is_causal=True, or "
            f"spattn.attention(q, k, v, plan) with a BlockPlan (e.g. BlockPlan.from_dense)")
    if dropout_p != 0.0:
        raise SpattnError(f"{where}: dropout_p must be 0.0 (attention dropout is not "
                          f"implemented); got {dropout_p}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise SpattnError(f"{where}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        raise SpattnError(
            f"{where}: query, key and value must all have rank 4 (batch, heads, tokens, "
            f"head_dim) or rank 3 (heads, tokens, head_dim); got shapes {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}")
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise SpattnError(f"{where}: query heads ({query.shape[1]}) must equal key heads "
                          f"({key.shape[1]}) unless enable_gqa=True")
    if is_causal and query.shape[2] != key.shape[2]:
        # SDPA aligns the causal diagonal top-left; spattn aligns it bottom-right. Refuse
        # rather than return something SDPA would not.
        raise SpattnError(
            f"{where}: is_causal with query length {query.shape[2]} != key length "
            f"{key.shape[2]} is not supported: SDPA aligns the diagonal top-left, spattn "
            f"bottom-right. Call spattn.attention(q, k, v, causal=True) for bottom-right")
    return query, key, value, unbatched


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
         enable_gqa: bool = False) -> Tensor:
    """Dense attention with ``torch.nn.functional.scaled_dot_product_attention``'s signature.

    Arguments spattn cannot honour raise :class:`spattn.SpattnError` naming the argument:
    an ``attn_mask`` tensor, ``dropout_p`` > 0, and ``is_causal`` with different query and key
    lengths (SDPA's diagonal is top-left aligned there)."""
    query, key, value, unbatched = _sdpa_args("spattn.sdpa", query, key, value, attn_mask,
                                              dropout_p, is_causal, enable_gqa)
    out = attention(query, key, value, causal=is_causal, scale=scale)
    return out.squeeze(0) if unbatched else out

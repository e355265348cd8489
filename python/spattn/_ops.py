"""torch custom ops over the C++ entry points (namespace ``spattn``).

The ops allocate their outputs with torch and hand every tensor to ``spattn._C`` as a DLPack
view, so nothing is copied and no libtorch symbol is linked. Each op has a fake (meta)
implementation so ``torch.compile(fullgraph=True)`` traces through it, and ``spattn::forward``
has autograd through q, k and v (plan arrays are integer data and are not differentiated).

Nothing on these paths reads device memory on the host, so the ops can be captured in CUDA
graphs: plan arrays in device memory are checked by shape only (the C++ side does the same).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C

__all__ = ["forward", "backward"]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # lse accumulates in float32 (float64 for float64 inputs), as the C++ API specifies.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_out(q: Tensor, dim_v: int) -> Tensor:
    # (B, Hq, Nq, Dv). When q is stored B,N,H,D (the usual result of projecting then
    # transposing), keep that memory order so the caller's out.transpose(1, 2).reshape(...)
    # is free; otherwise plain contiguous (B, H, N, D).
    b, h, n, _ = q.shape
    if not q.is_contiguous() and q.transpose(1, 2).is_contiguous():
        return q.new_empty((b, n, h, dim_v)).transpose(1, 2)
    return q.new_empty((b, h, n, dim_v))


def _stream(t: Tensor) -> int:
    # The caller's current stream: kernels are queued behind the torch work that made the inputs.
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _threads(t: Tensor) -> int:
    # Honour torch.set_num_threads for the CPU backend, so one knob controls both.
    return 0 if t.is_cuda else torch.get_num_threads()


def _device_guard(t: Tensor):
    # DLPack export of a CUDA tensor and the kernel launch both use the current device; make it
    # the tensors' device so inputs on cuda:1 work while cuda:0 is current.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _view(t: Optional[Tensor]) -> Optional[Tensor]:
    # DLPack export refuses tensors that require grad; the op body never needs the graph.
    return None if t is None else t.detach()


def _forward_outputs(q: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    # Uninitialised out (B, Hq, Nq, Dv) and lse (B, Hq, Nq): the op and its fake kernel agree.
    return _empty_out(q, v.shape[3]), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("spattn::forward", mutates_args=())
def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_index: Optional[Tensor],
    num_full: Optional[Tensor],
    num_partial: Optional[Tensor],
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
) -> Tuple[Tensor, Tensor]:
    """(out, lse) for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    Without plan arrays the attention is dense under the rule (causal, window)."""
    out, lse = _forward_outputs(q, v)
    with _device_guard(q):
        _C.forward(
            _view(q), _view(k), _view(v), out, lse,
            _view(kv_index), _view(num_full), _view(num_partial),
            block_q, block_k, scale, causal, window_left, window_right,
            _stream(q), _threads(q),
        )
    return out, lse


@forward.register_fake
def _(q, k, v, kv_index, num_full, num_partial, block_q, block_k, scale, causal,
      window_left, window_right):
    return _forward_outputs(q, v)


@torch.library.custom_op("spattn::backward", mutates_args=())
def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_index: Optional[Tensor],
    num_full: Optional[Tensor],
    num_partial: Optional[Tensor],
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out and lse; dk, dv are summed over each GQA group."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with _device_guard(q):
        _C.backward(
            _view(q), _view(k), _view(v), _view(out), _view(lse), _view(dout), dq, dk, dv,
            _view(kv_index), _view(num_full), _view(num_partial),
            block_q, block_k, scale, causal, window_left, window_right,
            _stream(q), _threads(q),
        )
    return dq, dk, dv


@backward.register_fake
def _(dout, q, k, v, out, lse, kv_index, num_full, num_partial, block_q, block_k, scale,
      causal, window_left, window_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _unit_last_stride(t: Tensor) -> Tensor:
    # Kernels read each row of D elements as one run. Incoming gradients are often expanded
    # (stride 0) or transposed views; copy only those.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _setup_context(ctx, inputs, output):
    (q, k, v, kv_index, num_full, num_partial, block_q, block_k, scale, causal, window_left,
     window_right) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_index, num_full, num_partial)
    # lse is an auxiliary output (the softmax normaliser, for callers that merge partial
    # attentions); it carries no gradient, so backpropagating through it fails loudly instead
    # of silently dropping a term.
    ctx.mark_non_differentiable(lse)
    ctx.args = (block_q, block_k, scale, causal, window_left, window_right)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, kv_index, num_full, num_partial = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = backward(
        _unit_last_stride(dout), q, k, v, out, lse, kv_index, num_full, num_partial, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("spattn::forward", _backward, setup_context=_setup_context)

"""spattn.patch: route a model's scaled_dot_product_attention calls through sparse attention.

How attention modules are found
-------------------------------
A submodule (or the model itself) is an *attention module* when either

1. its ``forward`` (or a function or lambda defined inside it) names
   ``scaled_dot_product_attention`` — ``F.scaled_dot_product_attention(...)``,
   ``torch.nn.functional.scaled_dot_product_attention(...)`` and a bare
   ``scaled_dot_product_attention(...)`` imported with ``from ... import`` all qualify; or
2. its class name ends with ``Attention`` (``LlamaAttention``, diffusers' ``Attention``,
   ``nn.MultiheadAttention``, ...), which covers modules that reach SDPA through a helper
   function or an attention-processor object.

``filter(name, module)`` picks which of them become sparse; the others keep dense SDPA.

How calls are routed
--------------------
Each attention module's ``forward`` is wrapped (an instance attribute, so hooks, ``state_dict``
and the class stay untouched). While a wrapped forward runs, a ``TorchFunctionMode`` intercepts
``torch.nn.functional.scaled_dot_product_attention`` however it was looked up (attribute access,
a ``from``-import bound before patching, or torch-internal callers) and sends it to spattn with
the patch's :class:`SparseAttentionConfig`. The innermost attention module on the call stack
decides, so a dense module nested in a sparse one stays dense. Modules are counted in
``handle.calls`` so a module that never reached SDPA (for example ``nn.MultiheadAttention`` on
its fused inference path, or with ``need_weights=True``) is visible.

SDPA arguments spattn cannot honour (an ``attn_mask`` tensor, ``dropout_p`` > 0) raise
:class:`spattn.SpattnError` naming the module and the argument. The redirect is per thread;
``torch.compile`` traces through it (Dynamo supports torch function modes).
"""

from __future__ import annotations

import functools
import threading
import types
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._C import SpattnError
from .config import SparseAttentionConfig
from .functional import _sdpa_args, attention
from .select import from_config

__all__ = ["patch", "PatchHandle", "find_attention_modules"]

_SDPA = torch.nn.functional.scaled_dot_product_attention
_NAME = "scaled_dot_product_attention"


def _code_mentions(code: types.CodeType, name: str) -> bool:
    if name in code.co_names:
        return True
    return any(isinstance(c, types.CodeType) and _code_mentions(c, name) for c in code.co_consts)


def _is_attention_module(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is not None and _code_mentions(code, _NAME):
        return True
    return type(module).__name__.lower().endswith("attention")


def find_attention_modules(model: nn.Module) -> List[str]:
    """Names of the modules :func:`patch` treats as attention modules ("" is the model)."""
    return [name for name, m in model.named_modules() if _is_attention_module(m)]


class _Entry:
    __slots__ = ("handle", "name", "sparse")

    def __init__(self, handle: "PatchHandle", name: str, sparse: bool):
        self.handle, self.name, self.sparse = handle, name, sparse


_local = threading.local()


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class _Redirect(TorchFunctionMode):
    """Active during one attention module's forward; the innermost module's entry decides."""

    def __init__(self, entry: _Entry):
        super().__init__()
        self.entry = entry

    def __enter__(self):
        _stack().append(self.entry)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _stack().pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            top = _stack()[-1]
            if top.sparse:
                return top.handle._sparse_sdpa(top.name, *args, **kwargs)
        return func(*args, **kwargs)


class PatchHandle:
    """What :func:`patch` did. ``names``: patched (sparse) modules; ``dense``: attention modules
    the filter kept dense; ``calls``: SDPA calls routed to spattn per patched module."""

    def __init__(self, model: nn.Module, config: SparseAttentionConfig):
        self.model = model
        self.config = config
        self.names: List[str] = []
        self.dense: List[str] = []
        self.calls: Dict[str, int] = {}
        self._density: Dict[str, Tensor] = {}
        self._wrapped: List[tuple] = []  # (module, wrapper, previous instance forward or None)
        self.active = False

    # ---- routing -------------------------------------------------------------------------------
    def _sparse_sdpa(self, name: str, query, key, value, attn_mask=None, dropout_p=0.0,
                     is_causal=False, scale=None, enable_gqa=False):
        where = f"spattn.patch (module {name!r})"
        q, k, v, unbatched = _sdpa_args(where, query, key, value, attn_mask, dropout_p,
                                        is_causal, enable_gqa)
        plan = from_config(q, k, self.config, causal=is_causal, scale=scale)
        self._density[name] = plan.density_tensor()
        self.calls[name] = self.calls.get(name, 0) + 1
        out = attention(q, k, v, plan, scale=scale)
        return out.squeeze(0) if unbatched else out

    def _wrap(self, name: str, module: nn.Module, sparse: bool) -> None:
        previous = module.__dict__.get("forward")
        inner = module.forward
        entry = _Entry(self, name, sparse)

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            with _Redirect(entry):
                return inner(*args, **kwargs)

        module.forward = forward
        self._wrapped.append((module, forward, previous))

    # ---- reporting -----------------------------------------------------------------------------
    def densities(self) -> Dict[str, float]:
        """Last plan density per patched module that has run."""
        return {name: float(d) for name, d in self._density.items()}

    def last_density(self) -> Optional[float]:
        """Mean over the patched modules that have run of their last plan's density (None
        before any has run)."""
        d = list(self._density.values())
        return float(torch.stack([x.float().cpu() for x in d]).mean()) if d else None

    def undo(self) -> None:
        """Restores every wrapped forward. Patches of one model must be undone in reverse order."""
        if not self.active:
            return
        for module, wrapper, previous in reversed(self._wrapped):
            if module.__dict__.get("forward") is not wrapper:
                raise SpattnError(
                    "PatchHandle.undo: a module's forward was replaced after this patch (another "
                    "patch still active?); undo patches in reverse order")
        for module, wrapper, previous in reversed(self._wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._wrapped.clear()
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return (f"PatchHandle({state}, sparse={self.names}, dense={self.dense}, "
                f"config={self.config})")


def patch(model: nn.Module, config: Optional[SparseAttentionConfig] = None,
          filter: Optional[Callable[[str, nn.Module], bool]] = None) -> PatchHandle:
    """Routes the SDPA calls of ``model``'s attention modules through spattn sparse attention.

    ``config`` (default ``SparseAttentionConfig()``) sets the hybrid selector; the plan is
    rebuilt from q and k on every call and not differentiated. ``filter(name, module)`` returns
    True for the attention modules to make sparse (e.g. ``lambda n, m: not n.startswith(
    "layers.0.")`` keeps the first layer dense). Works permanently (``handle.undo()``) or as a
    context manager (``with spattn.patch(model, cfg) as h: ...``). See the module docstring for
    how attention modules are found."""
    if not isinstance(model, nn.Module):
        raise SpattnError(f"spattn.patch: model must be a torch.nn.Module; got "
                          f"{type(model).__name__}")
    if config is None:
        config = SparseAttentionConfig()
    if not isinstance(config, SparseAttentionConfig):
        raise SpattnError(f"spattn.patch: config must be a spattn.SparseAttentionConfig; got "
                          f"{type(config).__name__}")
    handle = PatchHandle(model, config)
    for name, module in model.named_modules():
        if not _is_attention_module(module):
            continue
        sparse = True if filter is None else bool(filter(name, module))
        (handle.names if sparse else handle.dense).append(name)
        handle._wrap(name, module, sparse)
    handle.active = True
    if not handle.names:
        warnings.warn(
            f"spattn.patch: no attention module was made sparse in {type(model).__name__} "
            f"(found {len(handle.dense)} attention modules, all excluded by the filter)"
            if handle.dense else
            f"spattn.patch: found no attention module in {type(model).__name__} (a module "
            f"qualifies when its forward names scaled_dot_product_attention or its class name "
            f"ends with 'Attention')", stacklevel=2)
    return handle

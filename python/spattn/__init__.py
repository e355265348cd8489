"""spattn: trainable block-sparse attention for PyTorch (CPU and CUDA).

    import spattn
    out = spattn.attention(q, k, v, plan)                  # (B, H, N, D), any strides, GQA
    plan = spattn.select.hybrid(q, k, topk=0.03, topp=0.2)  # SpargeAttention2's selector
    with spattn.patch(model, spattn.SparseAttentionConfig()) as h: model(x)

See docs/python.md for the full API.
"""

import torch  # noqa: F401  (first: a CUDA build then shares the runtime torch loaded)

from . import _C
from ._C import SpattnError, __version__, cuda_backend_available
from . import _ops  # noqa: F401  (registers torch.ops.spattn.forward / backward)
from .plan import BlockPlan
from .config import SparseAttentionConfig
from .functional import attention, sdpa
from . import select
from . import nn
from .patching import PatchHandle, find_attention_modules, patch


def backend_supports(device: str, dtype, head_dim_qk: int, head_dim_v: int = None):
    """(ok, reason): whether the backend for ``device`` ("cpu"/"cuda") runs this case."""
    name = str(dtype).replace("torch.", "")
    return _C.backend_supports(str(device).split(":")[0], name, head_dim_qk,
                               head_dim_qk if head_dim_v is None else head_dim_v)


__all__ = [
    "SpattnError", "BlockPlan", "SparseAttentionConfig", "PatchHandle", "attention", "sdpa",
    "patch", "find_attention_modules", "select", "nn", "backend_supports",
    "cuda_backend_available", "__version__",
]

"""spattn.nn.SparseAttention, spattn.patch and torch.compile."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as imported_sdpa

spattn = pytest.importorskip("spattn")
if not hasattr(spattn, "_C"):
    pytest.skip("the spattn extension is not built", allow_module_level=True)

import reference  # noqa: E402

SpattnError = spattn.SpattnError
CFG = spattn.SparseAttentionConfig(topk=0.2, topp=0.3, block_q=16, block_k=16)


class SelfAttention(nn.Module):
    """A typical attention layer: projections, then F.scaled_dot_product_attention."""

    def __init__(self, dim=32, heads=4, kv_heads=None, causal=False):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.causal = causal

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim=32, heads=4, **kw):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, **kw)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(Block(**kw) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _expected_with_plans(model, x, cfg):
    """The model with every SDPA call replaced by the float64 reference on the plan the hybrid
    selector picks for that call's q and k: what the patched model must compute."""
    original = F.scaled_dot_product_attention
    densities = []

    def planned(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
        plan = spattn.select.from_config(q, k, cfg, causal=is_causal)
        densities.append(plan.density)
        return reference.attention(q, k, v, plan)[0].to(q.dtype)

    F.scaled_dot_product_attention = planned
    try:
        return model(x), densities
    finally:
        F.scaled_dot_product_attention = original


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Model(layers=2, causal=True).eval()


def test_patch_changes_outputs_only_as_the_plan_predicts(model):
    x = torch.randn(2, 100, 32)
    dense = model(x)
    expected, densities = _expected_with_plans(model, x, CFG)
    with spattn.patch(model, CFG) as handle:
        assert handle.names == ["layers.0.attn", "layers.1.attn"] and handle.dense == []
        sparse = model(x)
        assert handle.calls == {"layers.0.attn": 1, "layers.1.attn": 1}
        assert handle.last_density() == pytest.approx(sum(densities) / 2, rel=1e-5)
        assert 0 < handle.last_density() < 0.9
    assert (sparse - expected).abs().max() < 1e-4
    assert (sparse - dense).abs().max() > 1e-3  # the plan really dropped tiles
    # Undone on exit: the original forward is back and the output is the dense one again.
    assert "forward" not in model.layers[0].attn.__dict__
    assert torch.equal(model(x), dense)


def test_patch_with_all_tiles_is_dense(model):
    x = torch.randn(1, 70, 32)
    dense = model(x)
    handle = spattn.patch(model, spattn.SparseAttentionConfig(topk=1.0, topp=0.0, block_q=16,
                                                              block_k=16))
    try:
        assert (model(x) - dense).abs().max() < 1e-5
        assert handle.densities()["layers.0.attn"] == pytest.approx(
            spattn.BlockPlan.dense(70, block_q=16, block_k=16, causal=True).density)
    finally:
        handle.undo()
    assert not handle.active and "PatchHandle(undone" in repr(handle)


def test_filter_keeps_first_layer_dense_and_gradients_flow(model):
    x = torch.randn(2, 64, 32)
    handle = spattn.patch(model, CFG, filter=lambda name, m: not name.startswith("layers.0."))
    try:
        assert handle.names == ["layers.1.attn"] and handle.dense == ["layers.0.attn"]
        model.train()
        model(x).square().mean().backward()
        assert handle.calls == {"layers.1.attn": 1}
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    finally:
        handle.undo()


class FromImportAttention(nn.Module):
    """Calls SDPA through a name bound by `from ... import` before patching."""

    def forward(self, q, k, v):
        return imported_sdpa(q, k, v)


def _helper(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class HelperAttention(nn.Module):
    """Reaches SDPA through a helper function (like attention-interface registries)."""

    def forward(self, q, k, v):
        return _helper(q, k, v)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = HelperAttention()

    def forward(self, q, k, v):
        # Names SDPA itself (so it is an attention module) and also runs a nested one.
        return F.scaled_dot_product_attention(q, k, v) + self.inner(q, k, v)


def test_discovery_covers_from_import_helpers_and_nesting():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    plan = spattn.select.from_config(q, k, CFG)
    sparse = reference.attention(q, k, v, plan)[0].float()
    dense = F.scaled_dot_product_attention(q, k, v)
    for module in (FromImportAttention(), HelperAttention()):
        with spattn.patch(module, CFG) as h:
            assert h.names == [""]
            assert (module(q, k, v) - sparse).abs().max() < 1e-5
    outer = Outer()
    assert spattn.find_attention_modules(outer) == ["", "inner"]
    # The innermost attention module decides: a dense module nested in a sparse one stays dense.
    with spattn.patch(outer, CFG, filter=lambda name, m: name == "") as h:
        assert h.names == [""] and h.dense == ["inner"]
        assert (outer(q, k, v) - (sparse + dense)).abs().max() < 1e-5
    with spattn.patch(outer, CFG, filter=lambda name, m: name == "inner"):
        assert (outer(q, k, v) - (dense + sparse)).abs().max() < 1e-5


def test_patch_reports_and_errors():
    class MaskedAttention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8).bool())

    q = torch.randn(1, 1, 8, 16)
    seq = nn.Sequential(MaskedAttention())
    with spattn.patch(seq, CFG) as h:
        assert h.names == ["0"]
        with pytest.raises(SpattnError, match="spattn.patch \\(module '0'\\): attn_mask is not "
                                              "supported"):
            seq[0](q, q, q)
    with pytest.warns(UserWarning, match="found no attention module"):
        h = spattn.patch(nn.Linear(2, 2), CFG)
    assert h.names == [] and h.last_density() is None
    with pytest.raises(SpattnError, match="config must be a spattn.SparseAttentionConfig"):
        spattn.patch(seq, {"topk": 0.1})
    # Undo order is checked rather than silently restoring a stale forward.
    first = spattn.patch(seq, CFG)
    second = spattn.patch(seq, CFG)
    with pytest.raises(SpattnError, match="undo patches in reverse order"):
        first.undo()
    second.undo()
    first.undo()
    assert "forward" not in seq[0].__dict__


def test_sparse_attention_module_matches_plan_and_density():
    torch.manual_seed(1)
    layer = spattn.nn.SparseAttention(CFG, causal=True)
    q, k, v = (torch.randn(2, 4, 96, 16, requires_grad=True) for _ in range(3))
    out = layer(q, k, v)
    plan = layer.last_plan
    assert layer.last_density == pytest.approx(plan.density)
    assert torch.equal(plan.to_dense(),
                       spattn.select.from_config(q, k, CFG, causal=True).to_dense())
    assert (out - reference.attention(q, k, v, plan)[0]).abs().max() < 1e-5
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert "topk=0.2" in repr(layer)


class CompiledBlock(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.attn = spattn.nn.SparseAttention(CFG) if sparse else None

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.proj(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.attn is None:
            y = spattn.sdpa(q, k, v, is_causal=True)
        else:
            y = self.attn(q, k, v)
        return y.transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("sparse", [False, True])
def test_torch_compile_fullgraph(sparse):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = CompiledBlock(sparse)
    x = torch.randn(2, 80, 16)
    eager = block(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert (out - eager).abs().max() < 1e-5
    for p, g in zip(block.parameters(), eager_grads):
        assert (p.grad - g).abs().max() < 1e-4
    if sparse:
        assert block.attn.last_density is not None and block.attn.last_density < 1


def test_torch_compile_with_a_prepared_plan():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    plan = spattn.select.hybrid(q, k, topk=0.3, topp=0.3, block_q=16, block_k=16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return spattn.attention(q, k, v, plan) * 2

    assert (f(q, k, v) - 2 * spattn.attention(q, k, v, plan)).abs().max() < 1e-6


def test_torch_compile_of_a_patched_model(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 64, 32)
    with spattn.patch(model, CFG) as handle:
        eager = model(x)
        out = compiled(x)
        assert handle.calls == {"layers.0.attn": 2, "layers.1.attn": 2}
    assert (out - eager).abs().max() < 1e-5
    # Undoing the patch invalidates the compiled graph: dense again.
    assert (compiled(x) - model(x)).abs().max() < 1e-5

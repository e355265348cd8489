"""spattn.attention / spattn.sdpa against SDPA and the float64 masked-dense reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

spattn = pytest.importorskip("spattn")
if not hasattr(spattn, "_C"):
    pytest.skip("the spattn extension is not built", allow_module_level=True)

import reference  # noqa: E402

SpattnError = spattn.SpattnError

# Tolerances relative to max |reference|: half-precision inputs round q, k, v, P and out.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 1.5e-2}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite positions differ"
    scale = b[finite].abs().max().clamp_min(1e-12) if finite.any() else 1.0
    return float((a[finite] - b[finite]).abs().max() / scale) if finite.any() else 0.0


def make_qkv(b=2, hq=4, hkv=2, nq=150, nk=150, d=32, dv=None, dtype=torch.float32, seed=0,
             requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# ---- dense parity with SDPA -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_sdpa_forward_backward(dtype, causal):
    q, k, v = make_qkv(hq=4, hkv=4, nq=130, nk=130, dtype=dtype, requires_grad=True)
    out = spattn.sdpa(q, k, v, is_causal=causal)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    # SDPA in the same dtype, and the float64 truth both are measured against.
    ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    rdq, rdk, rdv = torch.autograd.grad(ref_out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
    g64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())

    assert out.dtype == dtype and out.shape == ref_out.shape
    # spattn may round P before P·V like tensor-core kernels do: allow 2x SDPA's own error.
    assert rel_err(out, out64) <= max(2 * rel_err(ref_out, out64), TOL[dtype])
    for ours, theirs, truth in zip((dq, dk, dv), (rdq, rdk, rdv), g64):
        assert rel_err(ours, truth) <= max(2 * rel_err(theirs, truth), GRAD_TOL[dtype])


def test_gqa_and_lse_match_reference():
    q, k, v = make_qkv(hq=6, hkv=2, nq=100, nk=170, d=24, dv=40)
    out, lse = spattn.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v)
    assert out.shape == (2, 6, 100, 40) and lse.shape == (2, 6, 100) and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert rel_err(lse, ref_lse) < TOL[torch.float32]
    sdpa_out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert rel_err(spattn.sdpa(q, k, v, enable_gqa=True), sdpa_out.double()) < TOL[torch.float32]


def test_any_strides_bnhd_layout_and_output_order():
    # (B, N, H, D) storage seen as (B, H, N, D): the usual projection-then-transpose layout.
    g = torch.Generator().manual_seed(1)
    qs, ks, vs = (torch.randn(2, 90, 4, 32, generator=g) for _ in range(3))
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
    assert not q.is_contiguous()
    out = spattn.attention(q, k, v)
    assert rel_err(out, reference.attention(q, k, v)[0]) < TOL[torch.float32]
    assert out.transpose(1, 2).is_contiguous()  # kept the caller's memory order
    # A last dimension with stride != 1 is copied, not rejected.
    q2 = torch.randn(2, 4, 90, 64, generator=g)[..., ::2]
    assert rel_err(spattn.attention(q2, k, v), reference.attention(q2, k, v)[0]) < TOL[torch.float32]


def test_unequal_lengths_causal_is_bottom_right_with_empty_rows():
    q, k, v = make_qkv(nq=200, nk=70, requires_grad=True)
    out, lse = spattn.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    assert torch.isneginf(lse[:, :, :130]).all() and (out[:, :, :130] == 0).all()
    assert rel_err(lse, ref_lse) < TOL[torch.float32]
    out.sum().backward()
    assert (q.grad[:, :, :130] == 0).all()


def test_window_matches_reference():
    q, k, v = make_qkv(nq=160, nk=160)
    for causal, window in ((False, 20), (True, 33), (False, (5, None)), (False, (None, 7))):
        left, right = spattn.plan.normalize_window(window, causal)
        out = spattn.attention(q, k, v, causal=causal, window=window)
        ref = reference.attention(q, k, v, causal=causal, window=(left, right))[0]
        assert rel_err(out, ref) < TOL[torch.float32], (causal, window)


def test_scale_is_honoured():
    q, k, v = make_qkv(nq=64, nk=64)
    out = spattn.attention(q, k, v, scale=0.3)
    assert rel_err(out, reference.attention(q, k, v, scale=0.3)[0]) < TOL[torch.float32]
    assert rel_err(spattn.sdpa(q[:, :2], k, v, scale=0.3),
                   F.scaled_dot_product_attention(q[:, :2], k, v, scale=0.3)) < TOL[torch.float32]


# ---- gradients ---------------------------------------------------------------------------------

def test_gradcheck_dense_float64():
    q, k, v = make_qkv(b=1, hq=2, hkv=1, nq=19, nk=23, d=8, dtype=torch.float64,
                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: spattn.attention(a, b, c, causal=True),
                                    (q, k, v), eps=1e-6, atol=1e-6)


def test_gradcheck_sparse_plan_float64():
    q, k, v = make_qkv(b=1, hq=2, hkv=2, nq=40, nk=50, d=8, dtype=torch.float64,
                       requires_grad=True)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(1, 2, 3, 4, generator=g) < 0.5
    plan = spattn.BlockPlan.from_dense(mask, q_len=40, k_len=50, block_q=16, block_k=16)
    assert torch.autograd.gradcheck(lambda a, b, c: spattn.attention(a, b, c, plan),
                                    (q, k, v), eps=1e-6, atol=1e-6)


def test_threads_agree():
    # spattn's CPU backend follows torch.set_num_threads.
    q, k, v = make_qkv(nq=256, nk=256)
    one = spattn.attention(q, k, v, causal=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = spattn.attention(q, k, v, causal=True)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_lse_is_not_differentiable():
    q, k, v = make_qkv(nq=32, nk=32, requires_grad=True)
    out, lse = spattn.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# ---- sparse plans against the masked-dense reference ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_random_plan_matches_reference(dtype, causal):
    q, k, v = make_qkv(b=2, hq=4, hkv=2, nq=150, nk=180, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    # One plan per kv head (GQA groups share), per batch; some rows left empty on purpose.
    mask = torch.rand(2, 2, 5, 6, generator=g) < 0.4
    mask[0, 1, 2] = False
    plan = spattn.BlockPlan.from_dense(mask, q_len=150, k_len=180, block_q=32, block_k=32,
                                       causal=causal)
    out = spattn.attention(q, k, v, plan)
    ref_q, ref_k, ref_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference.attention(ref_q, ref_k, ref_v, plan)
    assert rel_err(out, ref_out) < TOL[dtype]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), dout.double())
    for ours, truth in zip(grads, ref_grads):
        assert rel_err(ours, truth) < GRAD_TOL[dtype]


def test_hybrid_plan_matches_reference_and_selects_sparsely():
    q, k, v = make_qkv(b=1, hq=4, hkv=2, nq=256, nk=256, d=32, requires_grad=True)
    plan = spattn.select.hybrid(q, k, topk=0.1, topp=0.3, block_q=32, block_k=32, causal=True)
    assert plan.heads == 4 and plan.batch == 1
    assert 0 < plan.density < 0.6
    out = spattn.attention(q, k, v, plan)
    ref_q, ref_k, ref_v = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference.attention(ref_q, ref_k, ref_v, plan)
    assert rel_err(out, ref_out) < TOL[torch.float32]
    dout = torch.randn_like(out)
    for ours, truth in zip(torch.autograd.grad(out, (q, k, v), dout),
                           torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), dout.double())):
        assert rel_err(ours, truth) < GRAD_TOL[torch.float32]


def test_broadcast_plan_and_group_plans():
    q, k, v = make_qkv(b=2, hq=4, hkv=2, nq=96, nk=96)
    shared = spattn.BlockPlan.from_dense(torch.eye(3, dtype=torch.bool), q_len=96, block_q=32,
                                         block_k=32)
    assert (shared.batch, shared.heads) == (1, 1)
    assert rel_err(spattn.attention(q, k, v, shared),
                   reference.attention(q, k, v, shared)[0]) < TOL[torch.float32]
    grouped = spattn.select.hybrid(q, k, topk=0.3, topp=0.0, block_q=32, block_k=32,
                                   gqa_mode="group_max")
    assert grouped.heads == 2
    assert rel_err(spattn.attention(q, k, v, grouped),
                   reference.attention(q, k, v, grouped)[0]) < TOL[torch.float32]


def test_plan_rule_applies_and_conflicts_are_errors():
    q, k, v = make_qkv(nq=64, nk=64)
    plan = spattn.BlockPlan.dense(64, block_q=32, block_k=32, causal=True)
    ref = reference.attention(q, k, v, causal=True)[0]
    assert rel_err(spattn.attention(q, k, v, plan), ref) < TOL[torch.float32]
    assert rel_err(spattn.attention(q, k, v, plan, causal=True), ref) < TOL[torch.float32]
    with pytest.raises(SpattnError, match="window must match the plan's window"):
        spattn.attention(q, k, v, plan, window=8)
    plain = spattn.BlockPlan.dense(64, block_q=32, block_k=32)
    with pytest.raises(SpattnError, match="causal=True but the plan"):
        spattn.attention(q, k, v, plain, causal=True)


# ---- NumPy interop ------------------------------------------------------------------------------

def test_numpy_arrays_cross_without_copies():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 16)).astype(np.float32) for _ in range(3))
    out = np.zeros((1, 2, 40, 16), np.float32)
    lse = np.zeros((1, 2, 40), np.float32)
    q.setflags(write=False)  # read-only inputs are accepted
    spattn._C.forward(q, k, v, out, lse, None, None, None, 128, 64, 0.0, False, -1, -1)
    ref_out, ref_lse = reference.attention(*(torch.from_numpy(a.copy()) for a in (q, k, v)))
    assert rel_err(torch.from_numpy(out), ref_out) < TOL[torch.float32]
    assert rel_err(torch.from_numpy(lse), ref_lse) < TOL[torch.float32]
    # Plans from NumPy block maps, and torch.from_numpy views of NumPy memory.
    plan = spattn.BlockPlan.from_dense(np.ones((2, 1), bool), q_len=40, block_q=32, block_k=64)
    assert plan.to_dense().all()
    t = spattn.attention(*(torch.from_numpy(a.copy()) for a in (q, k, v)), plan)
    assert rel_err(t, ref_out) < TOL[torch.float32]


def test_numpy_errors_name_the_argument():
    a = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(SpattnError, match="lse must have dtype float32"):
        spattn._C.forward(a, a, a, a.copy(), np.zeros((1, 1, 8), np.float64), None, None, None,
                          128, 64, 0.0, False, -1, -1)
    with pytest.raises(SpattnError, match="q must have dtype float32, bfloat16, float16 or "
                                          "float64; got int32"):
        spattn._C.forward(a.astype(np.int32), a, a, a.copy(), np.zeros((1, 1, 8), np.float32),
                          None, None, None, 128, 64, 0.0, False, -1, -1)


# ---- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(nq=32, nk=32)
    assert issubclass(SpattnError, ValueError)
    with pytest.raises(SpattnError, match="k must be on q's device cpu; got meta"):
        spattn.attention(q, k.to("meta"), v)
    with pytest.raises(SpattnError, match="v must have q's dtype torch.float32; got torch.float16"):
        spattn.attention(q, k, v.half())
    with pytest.raises(SpattnError, match="q must have dtype float32, bfloat16, float16 or "
                                          "float64; got torch.int64"):
        spattn.attention(q.long(), k.long(), v.long())
    with pytest.raises(SpattnError, match=r"k.shape\[3\] \(head dim\) must equal q's 32; got 16"):
        spattn.attention(q, k[..., :16], v)
    with pytest.raises(SpattnError, match="q heads must be a multiple of k heads"):
        spattn.attention(q[:, :3], k, v)
    with pytest.raises(SpattnError, match="must have rank 4"):
        spattn.attention(q[0], k, v)
    with pytest.raises(SpattnError, match="scale must be a finite number > 0"):
        spattn.attention(q, k, v, scale=0.0)
    with pytest.raises(SpattnError, match="window must be >= 0 tokens; got -3"):
        spattn.attention(q, k, v, window=-3)
    plan = spattn.BlockPlan.dense(48, 32, block_q=16, block_k=16)
    with pytest.raises(SpattnError, match="plan lengths must match q and k"):
        spattn.attention(q, k, v, plan)
    with pytest.raises(SpattnError, match="plan must be a spattn.BlockPlan"):
        spattn.attention(q, k, v, plan=torch.ones(2, 2))
    # Errors from the C++ side arrive as SpattnError with the C++ message.
    with pytest.raises(SpattnError, match="head dim"):
        spattn.attention(*make_qkv(nq=8, nk=8, d=1000))


def test_sdpa_refuses_what_it_cannot_honour():
    q, k, v = make_qkv(hq=2, hkv=2, nq=16, nk=16)
    with pytest.raises(SpattnError, match="attn_mask is not supported"):
        spattn.sdpa(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(SpattnError, match="dropout_p must be 0.0"):
        spattn.sdpa(q, k, v, dropout_p=0.1)
    with pytest.raises(SpattnError, match=r"query heads \(4\) must equal key heads \(2\) unless "
                                          "enable_gqa=True"):
        spattn.sdpa(torch.cat([q, q], 1), k, v)
    with pytest.raises(SpattnError, match="is_causal with query length 8 != key length 16"):
        spattn.sdpa(q[:, :, :8], k, v, is_causal=True)
    # Unbatched (H, N, D) inputs work as in SDPA.
    out = spattn.sdpa(q[0], k[0], v[0])
    assert rel_err(out, F.scaled_dot_product_attention(q[0], k[0], v[0])) < TOL[torch.float32]

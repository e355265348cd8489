"""GPU path: DLPack of CUDA tensors, streams, device plans, CUDA graphs. Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

spattn = pytest.importorskip("spattn")
if not hasattr(spattn, "_C"):
    pytest.skip("the spattn extension is not built", allow_module_level=True)

import reference  # noqa: E402


def cuda_ready() -> bool:
    return torch.cuda.is_available() and spattn.cuda_backend_available()

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_ready(), reason="needs CUDA and spattn's CUDA backend")]

TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
GRAD_TOL = {torch.bfloat16: 8e-2, torch.float16: 1.5e-2}


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "non-finite positions differ"
    return float((a[finite] - b[finite]).abs().max() / b[finite].abs().max().clamp_min(1e-12))


def qkv(dtype, d=64, b=2, hq=4, hkv=2, nq=300, nk=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(b, h, n, d, generator=g).to("cuda", dtype)  # noqa: E731
    return make(hq, nq), make(hkv, nk), make(hkv, nk)


def supported(dtype, d):
    ok, reason = spattn.backend_supports("cuda", dtype, d)
    if not ok:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_sdpa(dtype, d, causal):
    supported(dtype, d)
    q, k, v = (t.requires_grad_() for t in qkv(dtype, d))
    out = spattn.attention(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(q64, k64, v64, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert out.is_cuda and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    for ours, truth in zip(grads, ref_grads):
        assert rel_err(ours, truth) < GRAD_TOL[dtype]
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert rel_err(out, sdpa) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_device_plans_match_reference(dtype):
    supported(dtype, 64)
    q, k, v = (t.requires_grad_() for t in qkv(dtype, nq=333, nk=400))
    plan = spattn.select.hybrid(q, k, topk=0.1, topp=0.3, causal=True)
    assert plan.device == q.device
    out = spattn.attention(q, k, v, plan)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(q64, k64, v64, plan)
    assert rel_err(out, ref) < TOL[dtype]
    dout = torch.randn_like(out)
    for ours, truth in zip(torch.autograd.grad(out, (q, k, v), dout),
                           torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert rel_err(ours, truth) < GRAD_TOL[dtype]
    # The same plan built on the host and moved gives the same result.
    host = spattn.BlockPlan.from_dense(plan.to_dense().cpu(), q_len=333, k_len=400, causal=True)
    assert torch.equal(spattn.attention(q, k, v, host.to("cuda")), out)


def test_runs_on_the_current_stream():
    supported(torch.bfloat16, 64)
    q, k, v = qkv(torch.bfloat16)
    expected = spattn.attention(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Queued behind this work only if spattn uses the current stream.
        q2 = q * 1.0
        out = spattn.attention(q2, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)


def test_cuda_graph_capture_and_replay():
    supported(torch.bfloat16, 64)
    q, k, v = qkv(torch.bfloat16)
    plan = spattn.select.hybrid(q, k, topk=0.2, topp=0.3)
    static_q = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        spattn.attention(static_q, k, v, plan)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = spattn.attention(static_q, k, v, plan)
    new_q = torch.randn_like(q)
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, spattn.attention(new_q, k, v, plan))


def test_device_mix_is_a_clear_error():
    q, k, v = qkv(torch.bfloat16)
    with pytest.raises(spattn.SpattnError, match="k must be on q's device cuda:0; got cpu"):
        spattn.attention(q, k.cpu(), v)
    plan = spattn.BlockPlan.dense(300)
    with pytest.raises(spattn.SpattnError, match="plan must be on q's device"):
        spattn.attention(q, k, v, plan)


def test_patch_on_gpu():
    supported(torch.bfloat16, 64)
    q, k, v = qkv(torch.bfloat16, hq=2, hkv=2)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    module = Attention()
    cfg = spattn.SparseAttentionConfig()
    with spattn.patch(module, cfg) as handle:
        out = module(q, k, v)
    plan = spattn.select.from_config(q, k, cfg)
    assert torch.equal(out, spattn.attention(q, k, v, plan))
    assert handle.last_density() == pytest.approx(plan.density)


def test_device_selector_matches_cpu_and_is_capturable():
    supported(torch.bfloat16, 64)
    q, k, v = qkv(torch.bfloat16, nq=700, nk=900)
    kwargs = dict(topk=0.05, topp=0.3, causal=True, sinks=1)
    gpu = spattn.select.hybrid(q, k, **kwargs)
    cpu = spattn.select.hybrid(q.cpu(), k.cpu(), **kwargs)
    assert gpu.device == q.device
    # Same plans up to float rounding at Top-p thresholds: nearly every tile agrees.
    agree = (gpu.to_dense().cpu() == cpu.to_dense()).float().mean().item()
    assert agree > 0.995
    static_q = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        spattn.attention(static_q, k, v, spattn.select.hybrid(static_q, k, **kwargs))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = spattn.select.hybrid(static_q, k, **kwargs)
        static_out = spattn.attention(static_q, k, v, plan)
    new_q = torch.randn_like(q)
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    expected = spattn.attention(new_q, k, v, spattn.select.hybrid(new_q, k, **kwargs))
    assert torch.equal(static_out, expected)

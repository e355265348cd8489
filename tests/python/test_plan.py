"""spattn.BlockPlan and the plan builders in spattn.select."""

import numpy as np
import pytest
import torch

spattn = pytest.importorskip("spattn")
if not hasattr(spattn, "_C"):
    pytest.skip("the spattn extension is not built", allow_module_level=True)

SpattnError = spattn.SpattnError
BlockPlan = spattn.BlockPlan


def test_from_dense_round_trip_and_classification():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 4, 5, generator=g) < 0.5
    plan = BlockPlan.from_dense(mask, q_len=100, k_len=150, block_q=32, block_k=32)
    assert (plan.batch, plan.heads, plan.num_q_blocks, plan.num_k_blocks) == (2, 3, 4, 5)
    assert plan.kv_index.dtype == torch.int32 and plan.capacity == 5
    assert torch.equal(plan.to_dense(), mask)
    assert plan.density == pytest.approx(mask.float().mean().item())
    # Tail tiles (the last query block holds 4 rows, the last kv block 22 keys) are partial.
    nf, npart = plan.num_full, plan.num_partial
    last_row = mask[..., 3, :].sum(-1).int()
    assert torch.equal(npart[..., 3], last_row) and (nf[..., 3] == 0).all()
    assert torch.equal(nf[..., :3] + npart[..., :3], mask[..., :3, :].sum(-1).int())
    assert torch.equal(npart[..., :3], mask[..., :3, 4].int())


def test_rule_drops_empty_tiles_and_dense_plan():
    ones = torch.ones(4, 4, dtype=torch.bool)
    plan = BlockPlan.from_dense(ones, q_len=128, block_q=32, block_k=32, causal=True)
    assert torch.equal(plan.to_dense()[0, 0], torch.ones(4, 4).tril().bool())
    assert torch.equal(plan.num_partial[0, 0], torch.ones(4, dtype=torch.int32))  # diagonal
    dense = BlockPlan.dense(128, block_q=32, block_k=32, causal=True)
    assert torch.equal(dense.to_dense(), plan.to_dense())
    assert dense.density == pytest.approx(10 / 16)
    stats = dense.stats()
    assert stats["allowed_density"] == pytest.approx(1.0) and stats["tiles"] == 10
    assert stats["partial_tiles"] == 4 and stats["full_tiles"] == 6
    windowed = BlockPlan.dense(128, block_q=32, block_k=32, window=(16, 0))
    assert windowed.window == (16, 0) and not windowed.causal
    assert windowed.to_dense()[0, 0].sum() == 7  # diagonal and one block to the left


def test_head_density_and_repr():
    mask = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    mask[0, 0] = True
    mask[0, 1, :, 0] = True
    plan = BlockPlan.from_dense(mask, q_len=64, k_len=256, block_q=32, block_k=64)
    assert plan.head_density().tolist() == pytest.approx([1.0, 0.25])
    assert plan.stats()["head_density"] == pytest.approx([1.0, 0.25])
    assert "BlockPlan(batch=1, heads=2, q_len=64, k_len=256, blocks=(32, 64)" in repr(plan)


def test_algebra():
    a = BlockPlan.from_dense(torch.eye(4, dtype=torch.bool), q_len=128, block_q=32, block_k=32)
    b = BlockPlan.from_dense(torch.ones(4, 4).tril().bool(), q_len=128, block_q=32, block_k=32)
    assert torch.equal((a | b).to_dense(), b.to_dense())
    assert torch.equal((a & b).to_dense(), a.to_dense())
    assert (b - a).to_dense()[0, 0].sum() == 6


def test_user_tensors_are_validated():
    kv = torch.tensor([[[[1, 0]]]], dtype=torch.int32)  # not ascending
    nf = torch.tensor([[[2]]], dtype=torch.int32)
    npart = torch.tensor([[[0]]], dtype=torch.int32)
    with pytest.raises(SpattnError, match="strictly ascending"):
        BlockPlan(kv, nf, npart, q_len=32, k_len=64, block_q=32, block_k=32)
    good = BlockPlan(kv.flip(-1).contiguous(), nf, npart, q_len=32, k_len=64, block_q=32,
                     block_k=32)
    assert good.to_dense().tolist() == [[[[True, True]]]]
    with pytest.raises(SpattnError, match="kv_index must have dtype torch.int32"):
        BlockPlan(kv.long(), nf, npart, q_len=32, k_len=64, block_q=32, block_k=32)
    with pytest.raises(SpattnError, match="block_q must be a power of two in"):
        BlockPlan(kv, nf, npart, q_len=32, k_len=64, block_q=48, block_k=32)
    with pytest.raises(SpattnError, match="kv_index.shape\\[2\\] must be num_q_blocks"):
        BlockPlan(kv, nf, npart, q_len=100, k_len=64, block_q=32, block_k=32)
    with pytest.raises(SpattnError, match="mask must have shape"):
        BlockPlan.from_dense(torch.ones(3, 3, dtype=torch.bool), q_len=64, block_q=32,
                             block_k=32)
    with pytest.raises(SpattnError, match="mask must have dtype torch.bool or torch.uint8"):
        BlockPlan.from_dense(torch.ones(2, 2), q_len=64, block_q=32, block_k=32)


def test_to_device_and_numpy_mask():
    plan = BlockPlan.from_dense(np.array([[1, 0], [1, 1]], np.uint8), q_len=64, block_q=32,
                                block_k=32)
    assert plan.to("cpu") is plan
    meta = plan.to("meta")
    assert meta.device.type == "meta" and meta.q_len == 64 and meta.kv_index.shape == (1, 1, 2, 2)


def test_save_png(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    q, k = torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    plan = spattn.select.hybrid(q, k, topk=0.2, topp=0.3, block_q=32, block_k=32, causal=True)
    path = tmp_path / "plan.png"
    plan.save_png(path, head=-1, size=256)
    image = Image.open(path)
    assert image.mode == "RGB" and min(image.size) > 0
    picture = plan.render(head=0, size=128)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3


def test_hybrid_options():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 256, 32, generator=g), torch.randn(2, 2, 256, 32, generator=g)
    base = spattn.select.hybrid(q, k, topk=0.1, topp=0.0, block_q=32, block_k=32)
    # Top-k only: ceil(0.1 * 8) = 1 block per row.
    assert (base.tiles_per_row() == 1).all()
    sinks = spattn.select.hybrid(q, k, topk=0.1, topp=0.0, block_q=32, block_k=32, sinks=1)
    assert sinks.to_dense()[..., 0].all()
    band = spattn.select.hybrid(q, k, topk=0.0, topp=0.0, block_q=32, block_k=32, local=1)
    assert band.to_dense()[0, 0].sum(-1).tolist() == [2, 3, 3, 3, 3, 3, 3, 2]
    per_head = spattn.select.hybrid(q, k, topk=[0.1, 0.1, 0.5, 1.0], topp=0.0, block_q=32,
                                    block_k=32)
    assert per_head.head_density().tolist() == pytest.approx([0.125, 0.125, 0.5, 1.0])
    grouped = spattn.select.hybrid(q, k, block_q=32, block_k=32, gqa_mode="group_mean")
    assert grouped.heads == 2
    cfg = spattn.SparseAttentionConfig(topk=0.1, topp=0.0, block_q=32, block_k=32)
    assert torch.equal(spattn.select.from_config(q, k, cfg).to_dense(), base.to_dense())
    scores = spattn.select.block_scores(q, k, block_q=32, block_k=32, causal=True)
    assert scores.shape == (2, 4, 8, 8) and (scores[0, 0, 0, 1:] == -1).all()
    assert scores[0, 0, 3, :4].sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SpattnError, match="top_k values must be in \\[0, 1\\]"):
        spattn.select.hybrid(q, k, topk=1.5)
    with pytest.raises(SpattnError, match="gqa_mode must be"):
        spattn.select.hybrid(q, k, gqa_mode="mean")
    with pytest.raises(SpattnError, match="local must be an int >= 0"):
        spattn.select.hybrid(q, k, local=-1)


def test_config_validation():
    with pytest.raises(SpattnError, match="topk must be a number in \\[0, 1\\]; got 3"):
        spattn.SparseAttentionConfig(topk=3)
    with pytest.raises(SpattnError, match="block_k must be a power of two"):
        spattn.SparseAttentionConfig(block_k=100)
    with pytest.raises(SpattnError, match="gqa_mode must be one of"):
        spattn.SparseAttentionConfig(gqa_mode="grouped")


def test_patterns():
    sel = spattn.select
    causal = sel.causal(256, block_q=32, block_k=32)
    assert causal.causal and causal.to_dense()[0, 0].sum() == 36
    win = sel.sliding_window(256, 40, 0, block_q=32, block_k=32)
    assert win.window == (40, 0) or win.window_left == 40
    mistral = sel.mistral(256, 64, block_q=32, block_k=32)
    assert mistral.causal
    bird = sel.bigbird(512, batch=2, heads=2, block_q=32, block_k=32, seed=1)
    assert bird.batch == 2 and bird.heads == 2 and 0 < bird.density < 1
    long = sel.longformer(256, 32, 32, global_tokens=[0], block_q=32, block_k=32)
    assert long.to_dense()[0, 0, :, 0].all() and long.to_dense()[0, 0, 0].all()
    doc = sel.document([0, 64, 128], block_q=32, block_k=32)
    assert doc.to_dense()[0, 0].tolist()[0] == [True, True, False, False]
    video = sel.video_window(4, 4, 4, 1, 1, 1, block_q=16, block_k=16)
    assert video.q_len == 64 and video.to_dense()[0, 0].diagonal().all()
    for plan in (sel.strided(256, 32, block_q=32, block_k=32),
                 sel.fixed(256, 64, 8, block_q=32, block_k=32),
                 sel.dilated_window(256, 8, 8, 4, block_q=32, block_k=32)):
        q = torch.randn(1, 1, 256, 16)
        out = spattn.attention(q, q, q, plan)
        assert torch.isfinite(out).all()

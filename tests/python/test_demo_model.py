"""The demo's video DiT and procedural dataset (CPU, no compiled extension needed)."""


import pytest
import torch
import torch.nn.functional as F

from source_tree import import_spattn

import_spattn()

from spattn.demo.data import NUM_CLASSES, MovingShapes, MovingShapesStream, StepBatches  # noqa: E402
from spattn.demo.model import CONFIGS, Attention, build_model, sincos_3d  # noqa: E402
from spattn.distill import attention_time  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_dataset_is_deterministic_from_seed():
    a = MovingShapes(frames=4, size=16, seed=3)
    b = MovingShapes(frames=4, size=16, seed=3)
    c = MovingShapes(frames=4, size=16, seed=4)
    va, la = a.batch(range(6))
    vb, lb = b.batch(range(6))
    vc, _ = c.batch(range(6))
    assert torch.equal(va, vb) and torch.equal(la, lb)
    assert not torch.equal(va, vc)
    assert torch.equal(a[5][0], va[5])  # index-addressed: no hidden iterator state
    assert va.shape == (6, 3, 4, 16, 16) and va.dtype == torch.float32
    assert va.min() >= -1 and va.max() <= 1
    assert ((la >= 0) & (la < NUM_CLASSES)).all()


def test_dataset_motion_follows_label():
    """Frame-to-frame shift (found by wrap-around cross-correlation, as the scene is a torus)
    points the way the label's direction says."""
    ds = MovingShapes(frames=6, size=32, seed=0)
    expected = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}  # (dy, dx) sign per direction
    for i in range(24):
        video, label = ds[i]
        gray = video.mean(0)  # (T, H, W)
        total = torch.zeros(2)
        for f in range(gray.shape[0] - 1):
            a, b = gray[f] - gray[f].mean(), gray[f + 1] - gray[f + 1].mean()
            best = max(((sy, sx) for sy in range(-3, 4) for sx in range(-3, 4)),
                       key=lambda s: float((torch.roll(a, s, dims=(0, 1)) * b).sum()))
            total += torch.tensor(best, dtype=torch.float32)
        ey, ex = expected[label % 4]
        along = total[0] * ey + total[1] * ex
        across = total[0] * ex + total[1] * ey
        assert along > 0 and abs(across) <= 1, (i, label, total)


def test_step_batches_and_stream():
    ds = MovingShapes(frames=4, size=16, seed=1)
    batches = StepBatches(ds, 3)
    x, y = batches(2)
    assert torch.equal(x[0], ds[6][0]) and y.shape == (3,)
    stream = iter(MovingShapesStream(frames=4, size=16, seed=1))
    assert torch.equal(next(stream)[0], ds[0][0])


@pytest.mark.parametrize("name", ["tiny", "cpu-demo", "gpu"])
def test_config_sizes(name):
    cfg = CONFIGS[name]
    n = cfg.num_tokens
    if name == "cpu-demo":
        assert 256 <= n <= 1024
    if name == "gpu":
        assert n >= 4096
    assert cfg.head_dim in (32, 64, 128)


def test_model_shapes_and_patchify_roundtrip():
    torch.manual_seed(0)
    model = build_model("tiny")
    c = model.config
    x = torch.randn(2, c.channels, c.frames, c.height, c.width)
    tokens = model.patchify(x)
    assert tokens.shape == (2, c.num_tokens, model.patch_dim)
    assert torch.equal(model.unpatchify(tokens), x)
    out = model(x, torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == x.shape
    # adaLN-Zero: the untrained model is exactly zero, every block starts as the identity.
    assert torch.count_nonzero(out) == 0
    with pytest.raises(ValueError):
        model(x[:, :, :2], torch.rand(2), torch.tensor([0, 3]))


def test_tokens_are_frame_major():
    """A block of consecutive tokens must be a compact space-time region (frame, then rows)."""
    model = build_model("tiny")
    c = model.config
    x = torch.zeros(1, c.channels, c.frames, c.height, c.width)
    x[0, :, 1] = 1.0  # light up frame 1 only
    tokens = model.patchify(x)[0].abs().sum(-1)
    per_frame = c.num_tokens // c.frames
    lit = tokens.nonzero().flatten()
    assert lit.min() == per_frame and lit.max() == 2 * per_frame - 1


def test_position_table_distinguishes_tokens():
    table = sincos_3d(64, (4, 8, 8))
    assert table.shape == (256, 64)
    assert torch.unique(table, dim=0).shape[0] == 256


def test_attention_goes_through_sdpa_at_call_time():
    """A patcher that swaps F.scaled_dot_product_attention during forward intercepts the call."""
    torch.manual_seed(0)
    model = build_model("tiny")
    for p in model.parameters():  # make the output depend on attention
        torch.nn.init.normal_(p, std=0.05)
    c = model.config
    x = torch.randn(1, c.channels, c.frames, c.height, c.width)
    t, y = torch.tensor([0.5]), torch.tensor([1])
    dense = model(x, t, y)
    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return torch.zeros_like(q)

    F.scaled_dot_product_attention = spy
    try:
        zeroed = model(x, t, y)
    finally:
        F.scaled_dot_product_attention = original
    assert len(calls) == c.depth
    assert calls[0] == (1, c.heads, c.num_tokens, c.head_dim)
    assert not torch.allclose(dense, zeroed)
    with attention_time(model) as timing:
        model(x, t, y)
    assert timing.calls == c.depth and timing.seconds > 0
    assert all(m.timer is None for m in model.modules() if isinstance(m, Attention))

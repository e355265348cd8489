"""Velocity distillation, checkpoints, sampling and evaluation on the tiny demo DiT (CPU).

Most tests patch the student with ``BlockTopKDouble``, a test double defined here: plain PyTorch
block Top-k masking around SDPA. It exists so the training driver can be tested on its own; it is
not spattn's sparse attention. The test at the end runs the real ``spattn.patch`` when the
package provides it.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from source_tree import import_spattn

spattn, HAVE_PACKAGE = import_spattn()
from spattn.demo.data import MovingShapes, StepBatches  # noqa: E402
from spattn.demo.model import build_model  # noqa: E402
from spattn.distill import (CheckpointError, TrainOptions, distill, load_checkpoint,  # noqa: E402
                            make_noise, make_probe_set, psnr, sample_euler, save_checkpoint,
                            save_line_plot, train_flow_matching, velocities,
                            velocity_relative_error)

torch.set_num_threads(min(2, torch.get_num_threads()))

BLOCK = 16
TARGET_SPARSITY = 0.9


class BlockTopKDouble:
    """Test double for a sparse-attention patcher (tests only).

    Wraps every module with a ``qkv`` projection (the demo DiT's ``Attention``) so that, during
    its forward, ``F.scaled_dot_product_attention`` keeps for each query block only the ``keep``
    key blocks with the highest pooled q.k score, as an additive -inf mask. The mask is computed
    under no_grad, as a real selector's is.
    """

    def __init__(self, model, keep_fraction):
        self.keep_fraction = keep_fraction
        self._density = None
        self._originals = []
        for m in model.modules():
            if hasattr(m, "qkv"):
                self._originals.append((m, m.forward))
                m.forward = self._wrap(m.forward)

    def last_density(self):
        return self._density

    def remove(self):
        for m, fwd in self._originals:
            m.forward = fwd

    def _wrap(self, forward):
        def patched(*args, **kwargs):
            original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = self._sparse_sdpa(original)
            try:
                return forward(*args, **kwargs)
            finally:
                F.scaled_dot_product_attention = original
        return patched

    def _sparse_sdpa(self, dense):
        def sdpa(q, k, v, *args, **kwargs):
            b, h, n, d = q.shape
            nb = n // BLOCK
            keep = max(1, int(self.keep_fraction * nb))  # floor: never denser than asked
            with torch.no_grad():
                qb = q.reshape(b, h, nb, BLOCK, d).mean(3)
                kb = k.reshape(b, h, nb, BLOCK, d).mean(3)
                top = (qb @ kb.transpose(-1, -2)).topk(keep, dim=-1).indices  # (B, H, nb, keep)
                blocks = torch.zeros(b, h, nb, nb, dtype=torch.bool, device=q.device)
                blocks.scatter_(-1, top, True)
                mask = blocks.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
            self._density = keep / nb
            return dense(q, k, v, attn_mask=mask)
        return sdpa


def double_patch(keep_fraction=1.0 - TARGET_SPARSITY):
    return lambda model, config: BlockTopKDouble(model, keep_fraction)


def _data(seed=0, batch=4):
    cfg = build_model("tiny").config
    return StepBatches(MovingShapes(cfg.frames, cfg.height, cfg.channels, seed=seed), batch)


@pytest.fixture(scope="module")
def teacher_state():
    """A tiny teacher trained briefly: enough that attention matters to its output (a fresh
    adaLN-Zero model outputs zeros whatever its attention does)."""
    torch.manual_seed(0)
    model = build_model("tiny")
    train_flow_matching(model, _data(), steps=40, lr=2e-3, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _teacher(state):
    model = build_model("tiny")
    model.load_state_dict(state)
    return model


def test_distillation_loss_decreases_and_reaches_sparsity(teacher_state, tmp_path):
    model = _teacher(teacher_state)
    plot = tmp_path / "curve.png"
    result = distill(model, _data(seed=1), None, patch_fn=double_patch(), steps=30, lr=1e-3,
                     progress=False, plot_path=str(plot))
    losses = result.losses
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    sparsity = 1 - result.history[-1]["density"]
    assert sparsity >= TARGET_SPARSITY - 1e-9
    assert plot.exists() and plot.stat().st_size > 1000
    # The teacher is a frozen copy, untouched by training.
    for k, v in result.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k])
    assert not any(p.requires_grad for p in result.teacher.parameters())


def test_distillation_moves_student_toward_teacher(teacher_state):
    """Velocity error on held-out inputs falls after distillation."""
    x0, y = MovingShapes(4, 16, 3, seed=99).batch(range(8))
    probe = make_probe_set(x0, y, seed=7)
    teacher = _teacher(teacher_state)
    ref = velocities(teacher, probe)
    student = _teacher(teacher_state)
    handle = BlockTopKDouble(student, 1.0 - TARGET_SPARSITY)
    before = velocity_relative_error(student, ref, probe)
    handle.remove()
    result = distill(student, _data(seed=2), None, patch_fn=double_patch(), steps=40, lr=1e-3,
                     progress=False)
    after = velocity_relative_error(result.model, ref, probe)
    assert after < before, (before, after)


def test_diffusion_loss_option_runs(teacher_state):
    result = distill(_teacher(teacher_state), _data(seed=3), None, patch_fn=double_patch(),
                     steps=3, loss="diffusion", progress=False)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)


def test_resume_gives_same_next_step_loss(teacher_state, tmp_path):
    opts = TrainOptions(steps=5, lr=1e-3, grad_accum=2, progress=False, seed=5)
    torch.manual_seed(123)
    full = distill(_teacher(teacher_state), _data(seed=4), None, patch_fn=double_patch(),
                   options=opts)

    ckpt = tmp_path / "run"
    torch.manual_seed(123)
    first = distill(_teacher(teacher_state), _data(seed=4), None, patch_fn=double_patch(),
                    options=opts, steps=3, checkpoint_dir=str(ckpt), checkpoint_every=3)
    assert first.losses == full.losses[:3]
    torch.manual_seed(999)  # resume must restore RNG state, not rely on the caller's
    resumed = distill(_teacher(teacher_state), _data(seed=4), None, patch_fn=double_patch(),
                      options=opts, checkpoint_dir=str(ckpt), checkpoint_every=3)
    assert resumed.resumed_from == 3
    assert len(resumed.losses) == 5
    for a, b in zip(resumed.losses[3:], full.losses[3:]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (resumed.losses, full.losses)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_teacher(teacher_state, tmp_path):
    ckpt = str(tmp_path / "run")
    distill(_teacher(teacher_state), _data(), None, patch_fn=double_patch(), steps=1,
            checkpoint_dir=ckpt, progress=False)
    other = build_model("tiny")
    with pytest.raises(CheckpointError, match="different teacher"):
        distill(other, _data(), None, patch_fn=double_patch(), steps=2, checkpoint_dir=ckpt,
                progress=False, check_teacher=False)


def _written_checkpoint(tmp_path):
    path = str(tmp_path / "c.ckpt")
    save_checkpoint(path, {"w": torch.arange(1000, dtype=torch.float32), "step": 3})
    assert load_checkpoint(path)["step"] == 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    return path


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = _written_checkpoint(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = _written_checkpoint(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 50])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    open(path, "wb").write(data[:10])  # cut inside the header
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_resume_from_corrupted_checkpoint_is_refused(teacher_state, tmp_path):
    ckpt = tmp_path / "run"
    distill(_teacher(teacher_state), _data(), None, patch_fn=double_patch(), steps=1,
            checkpoint_dir=str(ckpt), progress=False)
    path = ckpt / "last.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        distill(_teacher(teacher_state), _data(), None, patch_fn=double_patch(), steps=2,
                checkpoint_dir=str(ckpt), progress=False)


def test_patch_that_leaks_into_teacher_is_refused(teacher_state):
    """A patcher that swaps SDPA globally would make the teacher sparse too."""
    original = F.scaled_dot_product_attention

    def global_patch(model, config):
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: original(q, k, v) * 0.5
        return None

    try:
        with pytest.raises(RuntimeError, match="changed the teacher"):
            distill(_teacher(teacher_state), _data(), None, patch_fn=global_patch, steps=1,
                    progress=False)
    finally:
        F.scaled_dot_product_attention = original


def test_missing_patch_is_a_clear_error(teacher_state):
    if HAVE_PACKAGE and hasattr(spattn, "patch"):
        pytest.skip("spattn.patch exists")
    with pytest.raises(RuntimeError, match="spattn.patch is unavailable"):
        distill(_teacher(teacher_state), _data(), None, steps=1, progress=False)


def test_sampler_is_deterministic_and_metrics_agree(teacher_state):
    model = _teacher(teacher_state)
    cfg = model.config
    noise = make_noise((2, cfg.channels, cfg.frames, cfg.height, cfg.width), seed=3)
    y = torch.tensor([0, 5])
    a = sample_euler(model, noise, y, steps=4)
    b = sample_euler(model, make_noise(noise.shape, seed=3), y, steps=4)
    assert torch.equal(a, b)
    assert psnr(a, b) > 100
    assert psnr(a, -a) < 20
    x0, y = MovingShapes(4, 16, 3, seed=9).batch(range(4))
    probe = make_probe_set(x0, y)
    assert velocity_relative_error(model, model, probe) == 0.0


def test_line_plot(tmp_path):
    path = save_line_plot(str(tmp_path / "p.png"), {"a": ([1, 2, 3], [1.0, 0.1, 0.01]),
                                                    "b": ([1, 2, 3], [0.5, 0.4, None])},
                          title="t", xlabel="step", ylabel="loss", log_y=True, smooth=2)
    from PIL import Image
    assert Image.open(path).size == (900, 540)


def _real_patch():
    if not HAVE_PACKAGE or not hasattr(spattn, "patch"):
        return None
    return spattn.patch


@pytest.mark.skipif(_real_patch() is None, reason="spattn.patch is not available")
def test_distill_with_spattn_patch(teacher_state):
    from spattn.demo.sparsity import hybrid_config
    result = distill(_teacher(teacher_state), _data(seed=6), hybrid_config(0.03, 0.05, BLOCK),
                     steps=20, lr=1e-3, progress=False)
    losses = result.losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    density = result.history[-1]["density"]
    assert density is not None and 1 - density >= TARGET_SPARSITY - 0.05, density
    assert result.handle.names  # the attention layers really were patched


class _ReIterable:
    """An iterable that yields the same batches each time it is iterated (like a seeded loader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for i in range(1 << 20):
            yield self.batches(i)


def test_resume_with_iterable_data(teacher_state, tmp_path):
    data = _ReIterable(_data(seed=8))
    opts = TrainOptions(steps=4, lr=1e-3, progress=False)
    full = distill(_teacher(teacher_state), data, None, patch_fn=double_patch(), options=opts)
    ckpt = str(tmp_path / "run")
    distill(_teacher(teacher_state), data, None, patch_fn=double_patch(), options=opts, steps=2,
            checkpoint_dir=ckpt)
    resumed = distill(_teacher(teacher_state), data, None, patch_fn=double_patch(), options=opts,
                      checkpoint_dir=ckpt)
    assert resumed.resumed_from == 2
    for a, b in zip(resumed.losses[2:], full.losses[2:]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b))

"""The demo driver end to end on the tiny configuration (CPU).

The sparse attention here is ``HybridMaskDouble``, a test double written in plain PyTorch (pooled
block scores, Top-k union Top-p, an element mask handed to dense SDPA): it lets the driver's
calibration, training, evaluation and reporting be tested without the compiled extension. The
product path uses ``spattn.patch``; see the last test.
"""

import importlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from source_tree import import_spattn

spattn, _ = import_spattn()

demo_main = importlib.import_module("spattn.demo.__main__")

torch.set_num_threads(min(2, torch.get_num_threads()))


class HybridMaskDouble:
    """Test double: Top-k union Top-p block masking around dense SDPA (tests only)."""

    def __init__(self, model, setting):
        self.s = setting
        self._density = None
        for m in model.modules():
            if hasattr(m, "qkv"):
                m.forward = self._wrap(m.forward)

    def last_density(self):
        return self._density

    def _wrap(self, forward):
        def patched(*args, **kwargs):
            original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = self._sdpa(original)
            try:
                return forward(*args, **kwargs)
            finally:
                F.scaled_dot_product_attention = original
        return patched

    def _sdpa(self, dense):
        def sdpa(q, k, v, *args, **kwargs):
            b, h, n, d = q.shape
            bq, bk = self.s.block_q, self.s.block_k
            nq, nk = n // bq, n // bk
            with torch.no_grad():
                qm = q.reshape(b, h, nq, bq, d).mean(3)
                km = k.reshape(b, h, nk, bk, d).mean(3)
                probs = torch.softmax(qm @ km.transpose(-1, -2) / math.sqrt(d), -1)
                order = probs.sort(dim=-1, descending=True, stable=True)
                rank_keep = torch.zeros_like(probs, dtype=torch.bool)
                n_topk = math.ceil(self.s.topk * nk) if self.s.topk > 0 else 0
                rank_keep[..., :n_topk] = True
                if self.s.topp > 0:
                    before = order.values.cumsum(-1) - order.values  # mass of earlier blocks
                    rank_keep |= before < self.s.topp
                blocks = torch.zeros_like(rank_keep).scatter(-1, order.indices, rank_keep)
                mask = blocks.repeat_interleave(bq, 2).repeat_interleave(bk, 3)
                self._density = float(blocks.float().mean())
            out = dense(q, k, v, attn_mask=mask)
            return torch.nan_to_num(out)  # empty rows: output 0, as the real kernels define
        return sdpa


def test_demo_pipeline_tiny(tmp_path, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    argv = ["--config", "tiny", "--device", "cpu", "--out", out, "--cache", cache,
            "--teacher-steps", "40", "--tune-steps", "4"]
    rc = demo_main.main(argv, patch=HybridMaskDouble, build_config=lambda s: s)
    assert rc == 0
    text = capsys.readouterr().out
    assert "teacher: training tiny" in text and "| (c) velocity distillation |" in text
    results = json.load(open(os.path.join(out, "results.json")))
    rows = results["rows"]
    assert set(rows) >= {"dense teacher", "(a) training-free hybrid", "(b) diffusion-loss fine-tune",
                         "(c) velocity distillation", "Top-k only, distilled",
                         "Top-p only, distilled"}
    assert rows["dense teacher"]["vel_rel_err"] == 0.0
    for label, r in rows.items():
        if label != "dense teacher":
            assert r["sparsity"] >= 0.9 - 1e-6, (label, r["sparsity"])
            assert 0 < r["vel_rel_err"] < 10 and r["attn_ms"] > 0 and r["sample_s"] > 0
    for name in ("results.md", "samples.png", "curves.png", "teacher_loss.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert os.path.exists(os.path.join(cache, "teacher-tiny.ckpt"))

    # A second run reuses the cached teacher.
    rc = demo_main.main(argv + ["--no-ablations"], patch=HybridMaskDouble,
                        build_config=lambda s: s)
    assert rc == 0
    assert "teacher: loaded" in capsys.readouterr().out


def test_teacher_only_needs_no_extension(tmp_path):
    rc = demo_main.main(["--config", "tiny", "--device", "cpu", "--teacher-only",
                         "--out", str(tmp_path), "--cache", str(tmp_path), "--teacher-steps", "2"])
    assert rc == 0 and os.path.exists(os.path.join(tmp_path, "teacher-tiny.ckpt"))


def test_demo_without_sparse_attention_fails_early(tmp_path, capsys):
    if hasattr(spattn, "patch") and hasattr(spattn, "SparseAttentionConfig"):
        pytest.skip("spattn provides sparse attention")
    rc = demo_main.main(["--config", "tiny", "--device", "cpu", "--out", str(tmp_path),
                         "--cache", str(tmp_path)])
    assert rc == 2
    assert "sparse attention is unavailable" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(tmp_path, "teacher-tiny.ckpt"))


@pytest.mark.skipif(not (hasattr(spattn, "patch") and hasattr(spattn, "SparseAttentionConfig")),
                    reason="spattn.patch is not available")
def test_demo_pipeline_with_spattn(tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = demo_main.main(["--config", "tiny", "--device", "cpu", "--out", out, "--cache",
                         str(tmp_path), "--teacher-steps", "30", "--tune-steps", "3",
                         "--no-ablations"])
    assert rc == 0
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    for label in ("(a) training-free hybrid", "(c) velocity distillation"):
        assert rows[label]["sparsity"] >= 0.85, (label, rows[label])

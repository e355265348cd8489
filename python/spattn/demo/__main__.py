"""``python -m spattn.demo``: sparse attention on a small video DiT, end to end.

1. Obtain a dense teacher: a class-conditional flow-matching DiT on procedural moving-shape
   videos (loaded from the cache, or trained and cached; an interrupted training resumes).
2. Calibrate three mask rules (hybrid Top-k + Top-p, Top-k only, Top-p only) on the teacher so
   each reaches the target attention sparsity.
3. Compare, at that sparsity: (a) the training-free hybrid mask, (b) fine-tuning with the plain
   diffusion (flow-matching) loss, (c) velocity distillation, and the Top-k-only / Top-p-only
   ablations, against the dense teacher: velocity error on held-out inputs, PSNR of samples
   against the teacher's from identical noise, attention time and sampling time.
4. Write a table (results.md / results.json), sample frames and loss curves to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import torch

from ..distill import (TrainOptions, attention_time, distill, load_checkpoint, make_noise,
                       make_probe_set, psnr, relative_error, sample_euler, save_checkpoint,
                       save_line_plot, train_flow_matching, velocities)
from .data import NUM_CLASSES, MovingShapes, StepBatches, class_name
from .model import DiTConfig, VideoDiT, get_config
from .sparsity import MaskSetting, calibrate, handle_density, make_config, patch_fn
from .viz import save_frame_strips


@dataclass
class Preset:
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    tune_steps: int
    tune_batch: int
    tune_lr: float
    block_q: int
    block_k: int
    hybrid_topk: float  # Top-k part of the hybrid rule; Top-p is calibrated to the sparsity
    n_probe: int  # held-out (x_t, t, c) for the velocity error
    n_samples: int  # sampled videos compared with the teacher's
    sample_steps: int


PRESETS: Dict[str, Preset] = {
    "tiny": Preset(teacher_steps=150, teacher_batch=8, teacher_lr=2e-3, tune_steps=20,
                   tune_batch=4, tune_lr=5e-4, block_q=16, block_k=16, hybrid_topk=0.03,
                   n_probe=8, n_samples=2, sample_steps=8),
    # 512 tokens; query blocks of 64 tokens are whole frames, key blocks of 16 are two patch rows.
    # Top-k 0.05 keeps 2 of the 32 key blocks: with a single block (what 0.03 gives) Top-k would
    # only repeat Top-p's first pick and the union would equal Top-p alone.
    "cpu-demo": Preset(teacher_steps=1500, teacher_batch=16, teacher_lr=1e-3, tune_steps=100,
                       tune_batch=8, tune_lr=3e-4, block_q=64, block_k=16, hybrid_topk=0.05,
                       n_probe=16, n_samples=4, sample_steps=16),
    # 4096 tokens with SpargeAttention2's tile geometry (128 x 64).
    "gpu": Preset(teacher_steps=1500, teacher_batch=32, teacher_lr=5e-4, tune_steps=200,
                  tune_batch=8, tune_lr=1e-4, block_q=128, block_k=64, hybrid_topk=0.03,
                  n_probe=32, n_samples=4, sample_steps=32),
}

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def _autocast(x: torch.Tensor):
    # bf16 on CUDA as in training and sampling (the CUDA kernels take bf16/fp16); fp32 on CPU.
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda)


def _forward(model, batch):
    x, t, y = batch
    with _autocast(x):
        return model(x, t, y)


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Teacher


def teacher_file_candidates(name: str, cache: str) -> List[str]:
    return [os.path.join(cache, f"teacher-{name}.ckpt"), os.path.join(SHIPPED, f"teacher-{name}.ckpt")]


def load_teacher(path: str, cfg: DiTConfig, device: torch.device) -> Optional[VideoDiT]:
    state = load_checkpoint(path)
    if state.get("config") != cfg.to_dict():
        _log(f"  {path}: trained for another model configuration; ignoring it")
        return None
    model = VideoDiT(cfg)
    model.load_state_dict(state["model"])
    return model.to(device)


def obtain_teacher(name: str, cfg: DiTConfig, preset: Preset, args, device) -> VideoDiT:
    candidates = [args.teacher] if args.teacher else teacher_file_candidates(name, args.cache)
    if not args.retrain_teacher:
        for path in candidates:
            if path and os.path.exists(path):
                model = load_teacher(path, cfg, device)
                if model is not None:
                    _log(f"teacher: loaded {path}")
                    return model
    steps = args.teacher_steps or preset.teacher_steps
    _log(f"teacher: training {name} ({cfg.num_tokens} tokens, "
         f"{sum(p.numel() for p in VideoDiT(cfg).parameters()) / 1e6:.2f} M parameters) for "
         f"{steps} steps; interrupted runs resume from {args.cache}/teacher-{name}-run")
    torch.manual_seed(0)
    model = VideoDiT(cfg).to(device)
    data = StepBatches(MovingShapes(cfg.frames, cfg.height, cfg.channels, seed=0),
                       preset.teacher_batch)
    result = train_flow_matching(
        model, data, steps=steps, lr=preset.teacher_lr, warmup_steps=min(100, steps // 10),
        schedule="cosine", time_sampling="logit_normal", weight_decay=0.01,
        checkpoint_dir=os.path.join(args.cache, f"teacher-{name}-run"),
        checkpoint_every=max(50, steps // 20), device=str(device), desc="teacher",
        plot_path=os.path.join(args.out, "teacher_loss.png"))
    path = os.path.join(args.cache, f"teacher-{name}.ckpt")
    # Weights only (no optimizer), small enough to ship; the config guards against mismatches.
    save_checkpoint(path, {"config": cfg.to_dict(), "model": model.state_dict(), "steps": steps,
                           "final_loss": result.history[-1]["loss"] if result.history else None})
    _log(f"teacher: saved {path}")
    return model


# ---------------------------------------------------------------------------------------------
# Evaluation


class Context:
    """Held-out inputs and the teacher's outputs on them, shared by every row."""

    def __init__(self, teacher: VideoDiT, preset: Preset, device: torch.device, seed: int):
        cfg = teacher.config
        held_out = MovingShapes(cfg.frames, cfg.height, cfg.channels, seed=10_007 + seed)
        x0, y = held_out.batch(range(preset.n_probe))
        self.probe = make_probe_set(x0.to(device), y.to(device), seed=77 + seed)
        self.batch = min(16, preset.n_probe)
        self.teacher_u = velocities(teacher, self.probe, self.batch)
        n = preset.n_samples
        # Spread the sample labels over shapes and directions.
        self.labels = torch.tensor([(i * 5) % NUM_CLASSES for i in range(n)], device=device)
        self.noise = make_noise((n, cfg.channels, cfg.frames, cfg.height, cfg.width),
                                seed=2024 + seed, device=device)
        self.sample_steps = preset.sample_steps
        self.calibration = [self.probe.chunk(s, s + self.batch)
                            for s in range(0, len(self.probe), self.batch)]
        self.teacher_samples = None


def evaluate(model: VideoDiT, handle: Any, ctx: Context) -> Dict[str, Any]:
    densities: List[float] = []

    def fwd(m, x, t, c):
        with _autocast(x):
            out = m(x, t, c)
        d = handle_density(handle) if handle is not None else None
        if d is not None:
            densities.append(d)
        return out

    u = velocities(model, ctx.probe, ctx.batch, fwd)
    density = sum(densities) / len(densities) if densities else (1.0 if handle is None else None)
    # Warm up (allocations, kernel selection) before timing anything.
    x_bench = ctx.noise
    t_bench = torch.full((x_bench.shape[0],), 0.5, device=x_bench.device)
    with torch.no_grad():
        model.eval()
        fwd(model, x_bench, t_bench, ctx.labels)
        per_forward = []
        for _ in range(5):  # the minimum is the least disturbed by other work on the machine
            with attention_time(model) as timing:
                fwd(model, x_bench, t_bench, ctx.labels)
            per_forward.append(timing.seconds)
    attn_ms = 1e3 * min(per_forward)
    sync = torch.cuda.synchronize if x_bench.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    samples = sample_euler(model, ctx.noise, ctx.labels, ctx.sample_steps, forward_fn=fwd)
    sync()
    sample_s = time.perf_counter() - start
    row = {"sparsity": None if density is None else 1.0 - density,
           "vel_rel_err": relative_error(u, ctx.teacher_u), "attn_ms": attn_ms,
           "sample_s": sample_s, "samples": samples.cpu()}
    if ctx.teacher_samples is not None:
        row["psnr"] = psnr(samples, ctx.teacher_samples)
    return row


# ---------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m spattn.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, choices=sorted(PRESETS),
                   help="model size (default: gpu on CUDA, cpu-demo otherwise)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=os.path.join("build", "demo"), help="where results go")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "spattn"),
                   help="where trained teachers are kept")
    p.add_argument("--teacher", default=None, help="teacher checkpoint to use")
    p.add_argument("--retrain-teacher", action="store_true")
    p.add_argument("--teacher-only", action="store_true",
                   help="obtain (train) the teacher and stop; needs no compiled extension")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--tune-steps", type=int, default=None, help="fine-tuning steps per method")
    p.add_argument("--sparsity", type=float, default=0.9, help="target attention sparsity")
    p.add_argument("--no-ablations", action="store_true", help="skip Top-k-only / Top-p-only")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None, patch=None, build_config=None) -> int:
    """``patch(model, config)`` and ``build_config(MaskSetting)`` default to ``spattn.patch`` and
    ``spattn.SparseAttentionConfig``; they are parameters so the pipeline can be exercised on its
    own."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    name = args.config or ("gpu" if device.type == "cuda" else "cpu-demo")
    preset = PRESETS[name]
    cfg = get_config(name)
    os.makedirs(args.out, exist_ok=True)
    _log(f"spattn demo: config {name}, device {device}, output in {os.path.abspath(args.out)}")

    if not args.teacher_only:
        try:  # fail before spending minutes on a teacher
            patch = patch or patch_fn()
            build_config = build_config or make_config
            build_config(MaskSetting("hybrid", preset.hybrid_topk, 0.1, preset.block_q,
                                     preset.block_k))
        except (ImportError, AttributeError, RuntimeError) as e:
            _log(f"error: sparse attention is unavailable: {e}")
            _log("hint: `pip install -e .` builds the package; `--teacher-only` trains the "
                 "teacher without it")
            return 2

    teacher = obtain_teacher(name, cfg, preset, args, device)
    teacher.eval()
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    if args.teacher_only:
        return 0

    ctx = Context(teacher, preset, device, args.seed)
    target_density = 1.0 - args.sparsity
    _log(f"calibrating masks to sparsity >= {args.sparsity:.2f} on held-out inputs")
    base = MaskSetting("hybrid", preset.hybrid_topk, 0.0, preset.block_q, preset.block_k)
    settings: Dict[str, MaskSetting] = {}
    cal = calibrate(teacher, base, "topp", 0.0, 1.0, target_density, ctx.calibration,
                    _forward, patch, build=build_config)
    settings["hybrid"] = cal["setting"]
    _log(f"  hybrid: {cal['setting'].describe()} -> sparsity {1 - cal['density']:.3f}"
         + ("" if cal["met"] else "  (target not reachable: Top-k alone is denser)"))
    if not args.no_ablations:
        for rule, param in (("topk", "topk"), ("topp", "topp")):
            s = MaskSetting(rule, 0.0, 0.0, preset.block_q, preset.block_k)
            cal = calibrate(teacher, s, param, 0.0, 1.0, target_density, ctx.calibration,
                            _forward, patch, build=build_config)
            settings[rule] = cal["setting"]
            _log(f"  {rule}: {cal['setting'].describe()} -> sparsity {1 - cal['density']:.3f}")

    rows: Dict[str, Dict[str, Any]] = {}
    dense = evaluate(teacher, None, ctx)
    ctx.teacher_samples = dense["samples"].to(device)
    dense["psnr"] = math.inf
    rows["dense teacher"] = dict(dense, mask="full attention")

    def training_free(label, setting):
        model = copy.deepcopy(teacher)
        handle = patch(model, build_config(setting))
        rows[label] = dict(evaluate(model, handle, ctx), mask=setting.describe())

    curves: Dict[str, Any] = {}
    tune_steps = args.tune_steps or preset.tune_steps
    tune_data = StepBatches(MovingShapes(cfg.frames, cfg.height, cfg.channels, seed=1),
                            preset.tune_batch)

    def tuned(label, setting, loss):
        _log(f"{label}: {tune_steps} steps, {loss} loss, {setting.describe()}")
        model = copy.deepcopy(teacher)
        for p_ in model.parameters():
            p_.requires_grad_(True)
        result = distill(model, tune_data, build_config(setting), patch_fn=patch,
                         steps=tune_steps, lr=preset.tune_lr, loss=loss, device=str(device),
                         seed=args.seed, desc=label[:24], check_teacher=True)
        curves[label] = ([h["step"] for h in result.history], [h["loss"] for h in result.history])
        rows[label] = dict(evaluate(result.model, result.handle, ctx), mask=setting.describe())

    training_free("(a) training-free hybrid", settings["hybrid"])
    tuned("(b) diffusion-loss fine-tune", settings["hybrid"], "diffusion")
    tuned("(c) velocity distillation", settings["hybrid"], "velocity")
    if not args.no_ablations:
        training_free("Top-k only, training-free", settings["topk"])
        training_free("Top-p only, training-free", settings["topp"])
        tuned("Top-k only, distilled", settings["topk"], "velocity")
        tuned("Top-p only, distilled", settings["topp"], "velocity")

    report(rows, curves, ctx, args, name, device, tune_steps)
    return 0


def report(rows, curves, ctx, args, name, device, tune_steps) -> None:
    dense = rows["dense teacher"]
    header = ("| method | mask | sparsity | velocity rel. err | PSNR vs teacher (dB) | "
              "attention ms | attention speed-up | sampling s | sampling speed-up |")
    lines = [header, "|" + "---|" * 9]
    for label, r in rows.items():
        sp = "n/a" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        ps = "inf" if math.isinf(r.get("psnr", math.nan)) else f"{r.get('psnr', math.nan):.2f}"
        lines.append(f"| {label} | {r['mask']} | {sp} | {r['vel_rel_err']:.4f} | {ps} | "
                     f"{r['attn_ms']:.2f} | {dense['attn_ms'] / max(r['attn_ms'], 1e-9):.2f}x | "
                     f"{r['sample_s']:.2f} | {dense['sample_s'] / max(r['sample_s'], 1e-9):.2f}x |")
    table = "\n".join(lines)
    cfg = get_config(name)
    meta = (f"config {name} ({cfg.num_tokens} tokens, {cfg.depth} layers, {cfg.heads} heads x "
            f"{cfg.head_dim}), device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
               f" ({torch.get_num_threads()} threads)")
            + f", {tune_steps} fine-tuning steps per method, {len(ctx.probe)} held-out inputs, "
            f"{ctx.noise.shape[0]} samples x {ctx.sample_steps} Euler steps; attention ms is per "
            f"forward over all layers at batch {ctx.noise.shape[0]}")
    print()
    print(meta)
    print(table)

    out = args.out
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# spattn demo results\n\n{meta}\n\n{table}\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": {k: {kk: vv for kk, vv in v.items() if kk != "samples"}
                                          for k, v in rows.items()}}, f, indent=1, default=str)
    strips = {}
    for label, r in rows.items():
        for i in range(min(2, r["samples"].shape[0])):
            strips[f"{label[:30]} #{i}"] = r["samples"][i]
    samples_png = save_frame_strips(os.path.join(out, "samples.png"), strips)
    curves_png = None
    if curves:
        curves_png = save_line_plot(os.path.join(out, "curves.png"), curves,
                                    title="fine-tuning loss (diffusion loss is against x1 - x0; "
                                          "the others against the teacher)",
                                    xlabel="step", ylabel="MSE", log_y=True, smooth=5)
    print()
    print(f"wrote {os.path.join(out, 'results.md')}, results.json, {samples_png}"
          + (f", {curves_png}" if curves_png else ""))
    labels = ", ".join(class_name(int(c)) for c in ctx.labels[:2])
    print(f"samples.png rows: each method's first two samples ({labels}), frames left to right")


if __name__ == "__main__":
    sys.exit(main())

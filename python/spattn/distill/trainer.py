"""Training loops: velocity distillation of a sparse-attention student, and plain flow matching.

Convention (rectified flow): x_t = t * x1 + (1 - t) * x0 with x0 data and x1 Gaussian noise, so the
velocity is u = dx_t/dt = x1 - x0 and sampling integrates from t = 1 (noise) to t = 0 (data).

Velocity distillation (SpargeAttention2): the teacher is the model as given, frozen, with full
attention; the student is the same weights with sparse attention. Both see the same (x_t, t, c)
and the loss is ||u_student - u_teacher||^2. The data only builds x_t; the ground-truth velocity
is never used, so fine-tuning data that differs from pre-training data does not pull the student
away from the teacher's sampling dynamics. ``loss="diffusion"`` swaps in the plain flow-matching
target x1 - x0 for the ablation.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_fingerprint

ForwardFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]
PatchFn = Callable[[nn.Module, Any], Any]

CHECKPOINT_NAME = "last.ckpt"


@dataclass
class TrainOptions:
    """Optimisation and bookkeeping settings shared by :func:`distill` and :func:`train_flow_matching`.

    ``steps`` counts optimizer steps; each consumes ``grad_accum`` micro-batches from the data.
    """

    steps: int = 500
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine" (decays to 10% of lr at the last step)
    grad_clip: Optional[float] = 1.0
    grad_accum: int = 1
    loss: str = "velocity"  # "velocity" (distillation) or "diffusion" (flow-matching target)
    time_sampling: str = "uniform"  # or "logit_normal" (concentrates on mid-range t)
    amp: Optional[bool] = None  # None: bf16 autocast on CUDA, off elsewhere
    seed: int = 0
    device: Optional[str] = None  # None: wherever the model's parameters are
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 100
    resume: bool = True
    progress: bool = True
    desc: str = "distill"
    plot_path: Optional[str] = None

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"TrainOptions: steps must be >= 0; got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"TrainOptions: grad_accum must be >= 1; got {self.grad_accum}")
        if self.loss not in ("velocity", "diffusion"):
            raise ValueError(f"TrainOptions: loss must be 'velocity' or 'diffusion'; got {self.loss!r}")
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError("TrainOptions: time_sampling must be 'uniform' or 'logit_normal'; "
                             f"got {self.time_sampling!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainOptions: schedule must be 'constant' or 'cosine'; got {self.schedule!r}")


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (the student for distillation)
    history: List[Dict[str, Any]]  # one entry per optimizer step
    teacher: Optional[nn.Module] = None
    handle: Any = None  # what patch_fn returned (e.g. to read densities or unpatch)
    checkpoint_path: Optional[str] = None
    resumed_from: Optional[int] = None  # step the run resumed at, if it did

    @property
    def losses(self) -> List[float]:
        return [h["loss"] for h in self.history]


def default_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """``model(x, t, cond)``; a dict condition is passed as keyword arguments, None is left out."""
    if cond is None:
        return model(x, t)
    if isinstance(cond, dict):
        return model(x, t, **cond)
    return model(x, t, cond)


# ---------------------------------------------------------------------------------------------
# Data access


class _Batches:
    """Micro-batch ``i`` of the training data, for either kind of source.

    A callable ``data(i)`` is asked directly, so resuming at micro-batch i is exact and free.
    An iterable is re-iterated from the start and the first i batches are skipped: exact only if
    iterating it again yields the same sequence (a seeded DataLoader does), documented as such.
    """

    def __init__(self, data: Union[Callable[[int], Any], Iterable]):
        self.data = data
        self._iter = None
        self._next_index = 0
        self._peeked: Dict[int, Any] = {}

    def get(self, i: int) -> Any:
        if i in self._peeked:
            return self._peeked.pop(i)
        if callable(self.data) and not hasattr(self.data, "__iter__"):
            return self.data(i)
        if self._iter is None or i < self._next_index:
            self._iter = iter(self.data)
            self._next_index = 0
        while self._next_index < i:  # fast-forward after a resume
            next(self._iter)
            self._next_index += 1
        try:
            batch = next(self._iter)
        except StopIteration:
            raise RuntimeError(f"training data ran out at micro-batch {i}; give an endless "
                               "iterable or a callable data(i)") from None
        self._next_index += 1
        return batch

    def peek(self, i: int) -> Any:
        if i not in self._peeked:
            self._peeked[i] = self.get(i)
        return self._peeked[i]


def split_batch(batch: Any) -> Tuple[torch.Tensor, Any]:
    """A batch is ``x0`` or ``(x0, cond)`` or ``{"x0": ..., "cond": ...}``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return batch["x0"], batch.get("cond")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("training batches must be a tensor x0, a pair (x0, cond) or a dict with "
                    f"'x0' and optional 'cond'; got {type(batch).__name__}")


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _take(obj: Any, n: int) -> Any:
    if isinstance(obj, torch.Tensor) and obj.dim() > 0:
        return obj[:n]
    if isinstance(obj, dict):
        return {k: _take(v, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(v, n) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------
# Noise, time and randomness


def noise_and_time(x0: torch.Tensor, seed: int, index: int, time_sampling: str = "uniform"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise x1 and times t for micro-batch ``index``: a pure function of (seed, index), drawn on
    the CPU so runs on different devices (and resumed runs) see identical values."""
    g = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(index)) % (1 << 63))
    x1 = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    if time_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    else:
        t = torch.rand(x0.shape[0], generator=g)
    return x1.to(x0.device, x0.dtype), t.to(x0.device)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return tt * x1 + (1 - tt) * x0


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def handle_density(handle: Any) -> Optional[float]:
    """Mean density of the last sparse calls seen by a patch handle (None before any)."""
    fn = getattr(handle, "last_density", None)
    if fn is None:
        return None
    d = fn() if callable(fn) else fn
    if d is None:
        return None
    return float(d.float().mean()) if isinstance(d, torch.Tensor) else float(d)


def _lr_at(opts: TrainOptions, step: int) -> float:
    lr = opts.lr
    if opts.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / opts.warmup_steps)
    if opts.schedule == "cosine" and opts.steps > 1:
        progress = min(1.0, step / (opts.steps - 1))
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def _device_of(model: nn.Module, opts: TrainOptions) -> torch.device:
    if opts.device is not None:
        return torch.device(opts.device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The loop


def _run(model: nn.Module, teacher: Optional[nn.Module], handle: Any, batches: _Batches,
         opts: TrainOptions, forward_fn: ForwardFn, kind: str, teacher_fp: Optional[str],
         callback: Optional[Callable[[Dict[str, Any]], None]]) -> TrainResult:
    device = _device_of(model, opts)
    amp = opts.amp if opts.amp is not None else device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=opts.lr, betas=opts.betas, eps=opts.eps,
                              weight_decay=opts.weight_decay)
    history: List[Dict[str, Any]] = []
    start = 0
    ckpt_path = os.path.join(opts.checkpoint_dir, CHECKPOINT_NAME) if opts.checkpoint_dir else None
    resumed_from = None

    if ckpt_path and opts.resume and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path, map_location="cpu")
        if state.get("kind") != kind:
            raise CheckpointError(f"{ckpt_path} was written by a {state.get('kind')!r} run; this "
                                  f"is a {kind!r} run (use another checkpoint_dir)")
        if teacher_fp is not None and state.get("teacher_fingerprint") != teacher_fp:
            raise CheckpointError(f"{ckpt_path} was trained against different teacher weights; "
                                  "refusing to resume (use another checkpoint_dir)")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        history = list(state["history"])
        start = int(state["step"])
        resumed_from = start

    def save(step: int) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(ckpt_path, {
            "kind": kind, "step": step, "model": model.state_dict(),
            "optimizer": optim.state_dict(), "rng": _rng_state(), "history": history,
            "options": {k: v for k, v in asdict(opts).items()}, "teacher_fingerprint": teacher_fp,
        })

    bar = None
    if opts.progress and start < opts.steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=opts.steps, initial=start, desc=opts.desc, dynamic_ncols=True)

    model.train()
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    for step in range(start, opts.steps):
        t_start = time.perf_counter()
        lr = _lr_at(opts, step)
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad(set_to_none=True)
        loss_sum, densities, samples = 0.0, [], 0
        for a in range(opts.grad_accum):
            micro = step * opts.grad_accum + a
            x0, cond = split_batch(batches.get(micro))
            x0 = x0.to(device, torch.float32)
            cond = to_device(cond, device)
            x1, t = noise_and_time(x0, opts.seed, micro, opts.time_sampling)
            x_t = interpolate(x0, x1, t)
            if opts.loss == "velocity":
                with torch.no_grad(), autocast():
                    target = forward_fn(teacher, x_t, t, cond).float()
            else:
                target = x1 - x0
            with autocast():
                pred = forward_fn(model, x_t, t, cond)
            loss = torch.mean((pred.float() - target) ** 2)
            (loss / opts.grad_accum).backward()
            loss_sum += float(loss.detach())
            d = handle_density(handle)
            if d is not None:
                densities.append(d)
            samples += x0.shape[0]
        grad_norm = None
        if opts.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.grad_clip))
        optim.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_start
        entry = {"step": step + 1, "loss": loss_sum / opts.grad_accum, "lr": lr,
                 "density": sum(densities) / len(densities) if densities else None,
                 "grad_norm": grad_norm, "samples_per_s": samples / max(elapsed, 1e-9)}
        history.append(entry)
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"{kind}: loss became {entry['loss']} at step {step + 1}")
        if callback is not None:
            callback(entry)
        if bar is not None:
            post = {"loss": f"{entry['loss']:.4g}"}
            if entry["density"] is not None:
                post["sparsity"] = f"{1 - entry['density']:.3f}"
            post["samp/s"] = f"{entry['samples_per_s']:.1f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if ckpt_path and ((step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.steps):
            save(step + 1)
    if bar is not None:
        bar.close()
    if ckpt_path and start == opts.steps and not os.path.exists(ckpt_path):
        save(start)

    if opts.plot_path and history:
        from .plot import save_line_plot
        xs = [h["step"] for h in history]
        series = {f"{kind} loss": (xs, [h["loss"] for h in history])}
        save_line_plot(opts.plot_path, series, title=f"{kind} loss", xlabel="step",
                       ylabel="MSE", log_y=True)
    return TrainResult(model=model, history=history, teacher=teacher, handle=handle,
                       checkpoint_path=ckpt_path, resumed_from=resumed_from)


def _resolve_patch_fn(patch_fn: Optional[PatchFn]) -> PatchFn:
    if patch_fn is not None:
        return patch_fn
    try:
        import spattn  # imported here: spattn.distill must load without the compiled extension
        return spattn.patch
    except (ImportError, AttributeError) as e:
        raise RuntimeError("distill: no patch_fn given and spattn.patch is unavailable "
                           f"({e}); build and install the spattn package or pass patch_fn") from e


def distill(model: nn.Module, data: Union[Callable[[int], Any], Iterable], config: Any = None,
            patch_fn: Optional[PatchFn] = None, options: Optional[TrainOptions] = None, *,
            forward_fn: ForwardFn = default_forward,
            callback: Optional[Callable[[Dict[str, Any]], None]] = None,
            check_teacher: bool = True, **overrides) -> TrainResult:
    """Fine-tune ``model`` for sparse attention by velocity distillation from its dense self.

    ``model``: any diffusion transformer whose attention goes through SDPA; it is patched in place
    and becomes the student. A frozen deep copy taken *before* patching is the teacher.
    ``data``: ``data(i) -> batch`` or an iterable of batches; a batch is x0, (x0, cond) or a dict.
    ``config``: the sparse-attention configuration handed to ``patch_fn(model, config)``.
    ``patch_fn``: defaults to ``spattn.patch``; its return value is kept as ``result.handle`` and
    its ``last_density()`` (if any) is logged as sparsity = 1 - density.
    ``forward_fn(model, x_t, t, cond) -> velocity`` adapts other call signatures (t in [0, 1]).
    Keyword ``overrides`` replace fields of ``options`` (e.g. ``steps=100, loss="diffusion"``).
    """
    opts = _with_overrides(options, overrides)
    opts.validate()
    patch_fn = _resolve_patch_fn(patch_fn)
    device = _device_of(model, opts)
    model.to(device)

    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_fp = state_fingerprint(teacher)

    batches = _Batches(data)
    probe = None
    if check_teacher:
        x0, cond = split_batch(batches.peek(0))
        x0 = _take(x0, 2).to(device, torch.float32)
        cond = to_device(_take(cond, 2), device)
        x1, _ = noise_and_time(x0, opts.seed + 1, 0)
        t = torch.full((x0.shape[0],), 0.5, device=device)
        probe = (interpolate(x0, x1, t), t, cond)
        with torch.no_grad():
            before = forward_fn(teacher, *probe).float()

    handle = patch_fn(model, config)

    if probe is not None:
        with torch.no_grad():
            after = forward_fn(teacher, *probe).float()
        rel = float((after - before).norm() / before.norm().clamp_min(1e-12))
        if rel > 1e-4:
            raise RuntimeError("distill: patching the student changed the teacher's output "
                               f"(relative change {rel:.3g}); patch_fn must patch only the module "
                               "it is given, not SDPA globally")
    return _run(model, teacher, handle, batches, opts, forward_fn, "distill-" + opts.loss,
                teacher_fp, callback)


def train_flow_matching(model: nn.Module, data: Union[Callable[[int], Any], Iterable],
                        options: Optional[TrainOptions] = None, *,
                        forward_fn: ForwardFn = default_forward,
                        callback: Optional[Callable[[Dict[str, Any]], None]] = None,
                        **overrides) -> TrainResult:
    """Train ``model`` (from scratch or further) with the flow-matching loss ||u - (x1 - x0)||^2."""
    overrides.setdefault("desc", "teacher")
    opts = _with_overrides(options, overrides)
    opts.loss = "diffusion"
    opts.validate()
    model.to(_device_of(model, opts))
    return _run(model, None, None, _Batches(data), opts, forward_fn, "flow-matching", None,
                callback)


def _with_overrides(options: Optional[TrainOptions], overrides: Dict[str, Any]) -> TrainOptions:
    opts = copy.copy(options) if options is not None else TrainOptions()
    for k, v in overrides.items():
        if not hasattr(opts, k):
            raise TypeError(f"unknown training option {k!r}")
        setattr(opts, k, v)
    return opts

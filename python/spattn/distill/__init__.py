"""Fine-tuning diffusion transformers for sparse attention (velocity distillation).

Nothing here imports the compiled extension at import time: the patch step is injected
(``patch_fn``) and defaults to ``spattn.patch``, looked up only when :func:`distill` runs.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_fingerprint
from .evaluate import (AttentionTiming, ProbeSet, attention_time, make_probe_set, psnr, relative_error, time_call,
                       velocities, velocity_relative_error)
from .plot import save_line_plot
from .sampling import make_noise, sample_euler, time_grid
from .trainer import (TrainOptions, TrainResult, default_forward, distill, interpolate,
                      noise_and_time, train_flow_matching)

__all__ = [
    "AttentionTiming", "CheckpointError", "ProbeSet", "TrainOptions", "TrainResult", "attention_time",
    "default_forward", "distill", "interpolate", "load_checkpoint", "make_noise",
    "make_probe_set", "noise_and_time", "psnr", "relative_error", "sample_euler",
    "save_checkpoint", "save_line_plot", "state_fingerprint", "time_call", "time_grid",
    "train_flow_matching", "velocities", "velocity_relative_error",
]

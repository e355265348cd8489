"""Procedural video data: coloured shapes moving across a dark background.

Every clip is a pure function of ``(seed, index)``: nothing is stored on disk and two runs with the
same seed see the same pixels. The label is ``shape * len(DIRECTIONS) + direction`` so a
class-conditional model has to get both the appearance and the motion right, and the motion is
what makes attention reach across frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch

SHAPES = ("square", "disk", "triangle")
# (dy, dx) unit steps; the speed is drawn per clip.
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))
NUM_CLASSES = len(SHAPES) * len(DIRECTIONS)


def class_name(label: int) -> str:
    shape, direction = divmod(int(label), len(DIRECTIONS))
    return f"{SHAPES[shape]}-{('right', 'left', 'down', 'up')[direction]}"


@dataclass(frozen=True)
class MovingShapes(torch.utils.data.Dataset):
    """Map-style dataset of ``(video, label)`` with video ``(channels, frames, size, size)`` in [-1, 1].

    ``length`` only bounds ``len()`` for samplers; any non-negative index is valid, so training
    can draw fresh clips forever while a held-out split uses a different ``seed``.
    """

    frames: int = 8
    size: int = 32
    channels: int = 3
    seed: int = 0
    length: int = 1 << 30

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if index < 0:
            raise IndexError(f"MovingShapes: index must be >= 0; got {index}")
        # SeedSequence mixes (seed, index) so neighbouring indices are unrelated streams.
        rng = np.random.default_rng([self.seed, int(index)])
        label = int(rng.integers(NUM_CLASSES))
        return render_clip(rng, label, self.frames, self.size, self.channels), label

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        items = [self[i] for i in indices]
        videos = torch.stack([v for v, _ in items])  # (B, C, T, H, W)
        labels = torch.tensor([c for _, c in items], dtype=torch.long)
        return videos, labels


def render_clip(rng: np.random.Generator, label: int, frames: int, size: int,
                channels: int) -> torch.Tensor:
    shape, direction = divmod(label, len(DIRECTIONS))
    radius = size * rng.uniform(0.14, 0.22)
    speed = size * rng.uniform(0.035, 0.07)  # pixels per frame, so motion scales with the frame
    cy, cx = rng.uniform(0, size, 2)
    dy, dx = DIRECTIONS[direction]
    angle = rng.uniform(0, 2 * math.pi) if shape != 1 else 0.0
    colour = _random_colour(rng, channels)
    background = rng.uniform(-1.0, -0.7)

    t = np.arange(frames, dtype=np.float64)[:, None, None]
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    # The scene is a torus: the shape leaves one edge and re-enters on the other, so a clip never
    # goes empty and every frame carries the class.
    py = _wrap(yy[None] - (cy + dy * speed * t), size)
    px = _wrap(xx[None] - (cx + dx * speed * t), size)
    sdf = _shape_sdf(shape, py, px, radius, angle)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)  # one-pixel soft edge instead of aliasing
    video = background + alpha[None] * (colour[:, None, None, None] - background)
    return torch.from_numpy(video.astype(np.float32))  # (C, T, H, W)


def _wrap(d: np.ndarray, size: int) -> np.ndarray:
    return (d + size / 2) % size - size / 2


def _shape_sdf(shape: int, py: np.ndarray, px: np.ndarray, r: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    y, x = c * py - s * px, s * py + c * px
    if SHAPES[shape] == "square":
        return np.maximum(np.abs(x), np.abs(y)) - r * 0.85
    if SHAPES[shape] == "disk":
        return np.sqrt(x * x + y * y) - r
    # Equilateral triangle as the max of three half-plane distances.
    d = -np.inf
    for k in range(3):
        a = 2 * math.pi * k / 3 + math.pi / 2
        d = np.maximum(d, x * math.cos(a) + y * math.sin(a) - r * 0.6)
    return d


def _random_colour(rng: np.random.Generator, channels: int) -> np.ndarray:
    if channels == 1:
        return np.array([rng.uniform(0.3, 1.0)])
    hue = rng.uniform(0, 1)
    rgb = np.array([_hue_channel(hue + o) for o in (0.0, 2 / 3, 1 / 3)])
    rgb = 0.2 + 0.8 * rgb  # keep shapes bright against the dark background
    out = np.resize(rgb, channels)
    return out * 2.0 - 1.0


def _hue_channel(h: float) -> float:
    h = h % 1.0
    return float(np.clip(abs(h * 6 - 3) - 1, 0, 1))


class StepBatches:
    """Batch ``i`` of an endless, deterministic stream: indices ``[i*B, (i+1)*B)`` of the dataset.

    Being a function of the step (not an iterator) is what lets training resume exactly: the
    driver asks for batch ``i`` again instead of replaying the stream.
    """

    def __init__(self, dataset: MovingShapes, batch_size: int):
        self.dataset = dataset
        self.batch_size = batch_size

    def __call__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        start = i * self.batch_size
        return self.dataset.batch(range(start, start + self.batch_size))


class MovingShapesStream(torch.utils.data.IterableDataset):
    """The same clips as an iterable, for ``torch.utils.data.DataLoader`` users."""

    def __init__(self, frames: int = 8, size: int = 32, channels: int = 3, seed: int = 0):
        super().__init__()
        self.dataset = MovingShapes(frames, size, channels, seed)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        i = worker
        while True:
            yield self.dataset[i]
            i += workers

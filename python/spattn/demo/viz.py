"""Video frames to PNG with Pillow."""

from __future__ import annotations

import os
from typing import Dict

import torch
from PIL import Image, ImageDraw, ImageFont


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8; grey videos are repeated to RGB."""
    v = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if v.shape[0] == 1:
        v = v.repeat(3, 1, 1, 1)
    return v[:3].permute(1, 2, 3, 0).contiguous()


def save_frame_strips(path: str, rows: Dict[str, torch.Tensor], scale: int = 3,
                      label_width: int = 220, gap: int = 2) -> str:
    """One labelled row per entry, the video's frames left to right: ``{label: (C, T, H, W)}``."""
    frames = {k: video_to_uint8(v) for k, v in rows.items()}
    t, h, w, _ = next(iter(frames.values())).shape
    fw, fh = w * scale, h * scale
    width = label_width + t * (fw + gap)
    height = len(frames) * (fh + gap) + gap
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for r, (label, v) in enumerate(frames.items()):
        y = gap + r * (fh + gap)
        draw.text((4, y + fh // 2 - 6), label, fill="black", font=font)
        for i in range(v.shape[0]):
            frame = Image.fromarray(v[i].numpy()).resize((fw, fh), Image.NEAREST)
            img.paste(frame, (label_width + i * (fw + gap), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path

"""Line plots drawn with Pillow, so training curves need no plotting library."""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, count: int = 5):
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs(s - raw))
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-12 * abs(hi):
        ticks.append(v)
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    v = float(f"{v:.3g}")  # 10 ** log10(0.2) is not exactly 0.2
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def save_line_plot(path: str, series: Dict[str, Tuple[Sequence[float], Sequence[float]]],
                   title: str = "", xlabel: str = "", ylabel: str = "", log_y: bool = False,
                   smooth: int = 0, size: Tuple[int, int] = (900, 540)) -> str:
    """Draw ``{label: (xs, ys)}`` as lines with axes, ticks and a legend; writes a PNG.

    ``log_y`` plots log10(y) (losses span decades); ``smooth`` > 1 applies a trailing moving
    average of that many points so noisy per-step losses stay readable.
    """
    w, h = size
    left, right, top, bottom = 80, 20, 40, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    prepared = {}
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if y is not None and math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        if smooth > 1 and pts:
            vals = [p[1] for p in pts]
            avg = [sum(vals[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1))
                   for i in range(len(vals))]
            pts = [(p[0], a) for p, a in zip(pts, avg)]
        if log_y:
            pts = [(x, math.log10(y)) for x, y in pts]
        if pts:
            prepared[name] = pts
    all_pts = [p for pts in prepared.values() for p in pts]
    if not all_pts:
        all_pts = [(0.0, 0.0), (1.0, 1.0)]
    x0, x1 = min(p[0] for p in all_pts), max(p[0] for p in all_pts)
    y0, y1 = min(p[1] for p in all_pts), max(p[1] for p in all_pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _nice_ticks(x0, x1):
        draw.line([px(t), h - bottom, px(t), h - bottom + 5], fill="black")
        draw.text((px(t) - 12, h - bottom + 8), _fmt(t), fill="black", font=font)
    if log_y:
        # Decades, then 1-2-5 steps when the range spans less than a few decades.
        yticks = [float(e) for e in range(math.ceil(y0), math.floor(y1) + 1)]
        if len(yticks) < 3:
            yticks = [math.log10(m) + e for e in range(math.floor(y0), math.ceil(y1) + 1)
                      for m in (1, 2, 5) if y0 <= math.log10(m) + e <= y1]
        if len(yticks) < 2:
            yticks = _nice_ticks(y0, y1)
        labels = [_fmt(10 ** t) for t in yticks]
    else:
        yticks = _nice_ticks(y0, y1)
        labels = [_fmt(t) for t in yticks]
    for t, lab in zip(yticks, labels):
        draw.line([left - 5, py(t), w - right, py(t)], fill=(225, 225, 225))
        draw.line([left - 5, py(t), left, py(t)], fill="black")
        draw.text((5, py(t) - 6), lab, fill="black", font=font)
    draw.text((w / 2 - 4 * len(title), 12), title, fill="black", font=font)
    draw.text((w / 2 - 3 * len(xlabel), h - 25), xlabel, fill="black", font=font)
    draw.text((5, top - 25), ylabel + (" (log scale)" if log_y else ""), fill="black", font=font)

    for i, (name, pts) in enumerate(prepared.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = [(px(x), py(y)) for x, y in pts]
        if len(coords) == 1:
            cx, cy = coords[0]
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        else:
            draw.line(coords, fill=colour, width=2)
        ly = top + 10 + 16 * i
        draw.line([w - right - 190, ly + 6, w - right - 165, ly + 6], fill=colour, width=3)
        draw.text((w - right - 160, ly), name, fill="black", font=font)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    img.save(path)
    return path

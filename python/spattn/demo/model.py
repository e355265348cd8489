"""A small class-conditional video diffusion transformer (DiT) that predicts flow-matching velocity.

The attention layer calls ``F.scaled_dot_product_attention`` looked up on the module
``torch.nn.functional`` at call time, exactly like most public video DiTs do. That is the seam the
sparse-attention patcher uses: whatever function sits there while the block runs is the one that
computes attention, so the same model runs dense (teacher) or block-sparse (student).

Tokens are ordered frame-major, then row, then column, so a contiguous block of tokens is a
spatially compact slab of the video: block-sparse tiles then correspond to space-time regions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DiTConfig:
    channels: int = 3
    frames: int = 8
    height: int = 32
    width: int = 32
    patch: Tuple[int, int, int] = (1, 4, 4)  # (pt, ph, pw)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 12
    qk_norm: bool = True  # RMSNorm on q and k keeps logits bounded when training at high lr

    @property
    def grid(self) -> Tuple[int, int, int]:
        pt, ph, pw = self.patch
        return self.frames // pt, self.height // ph, self.width // pw

    @property
    def num_tokens(self) -> int:
        gt, gh, gw = self.grid
        return gt * gh * gw

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: Dict[str, DiTConfig] = {
    # Tests: 128 tokens, runs a full train/distill/sample cycle in seconds on a laptop core.
    "tiny": DiTConfig(frames=4, height=16, width=16, patch=(1, 2, 2), dim=64, depth=2, heads=2),
    # The CPU demo: 512 tokens (8 frames of 8x8 patches), about 0.8 M parameters.
    "cpu-demo": DiTConfig(frames=8, height=32, width=32, patch=(1, 4, 4), dim=128, depth=4,
                          heads=4),
    # GPU: 16 x 32 x 32 latents, 4096 tokens, head_dim 64.
    "gpu": DiTConfig(frames=16, height=32, width=32, patch=(1, 2, 2), dim=384, depth=8, heads=6),
}


def get_config(name: str, **overrides) -> DiTConfig:
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise ValueError(f"get_config: name must be one of {sorted(CONFIGS)}; got {name!r}") from None
    return replace(cfg, **overrides)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim must be divisible by heads; got {dim} and {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        # Anything with float `seconds` and int `calls` (spattn.distill.AttentionTiming): timing
        # the call itself keeps the projections out and includes what a patcher routes it to.
        self.timer: Optional[Any] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, D)
        # Normalise in float32 (autocast leaves RMSNorm alone, and bf16 input against float32
        # weights takes a slow unfused path), then back to v's dtype: attention wants one dtype.
        q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        if self.timer is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self._timed(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)

    def _timed(self, q, k, v):
        sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v)
        sync()
        self.timer.seconds += time.perf_counter() - start
        self.timer.calls += 1
        return out


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning regresses shift/scale/gate per branch and
    the gates start at zero, so every block starts as the identity (DiT's stable-init recipe)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1]; scaled by 1000 so the frequencies resolve small steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                            dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_3d(dim: int, grid: Tuple[int, int, int]) -> torch.Tensor:
    """Fixed 3-D sin/cos position table (N, dim): a third of the channels per axis (rounded to even),
    so the model can tell frames apart as easily as rows and columns."""
    per_axis = (dim // 3) // 2 * 2
    parts = []
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    for c in coords:
        half = per_axis // 2
        omega = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / max(half, 1)))
        args = c.reshape(-1, 1) * omega[None]
        parts += [torch.sin(args), torch.cos(args)]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


class VideoDiT(nn.Module):
    """Input ``x`` (B, C, T, H, W), ``t`` (B,) in [0, 1], ``y`` (B,) class ids; output velocity
    with the shape of ``x``. Convention: x_t = t * noise + (1 - t) * data, u = noise - data."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        pt, ph, pw = c.patch
        if c.frames % pt or c.height % ph or c.width % pw:
            raise ValueError(f"VideoDiT: patch {c.patch} must divide (T, H, W) = "
                             f"{(c.frames, c.height, c.width)}")
        self.patch_dim = c.channels * pt * ph * pw
        self.embed = nn.Linear(self.patch_dim, c.dim)
        self.register_buffer("pos", sincos_3d(c.dim, c.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.y_embed = nn.Embedding(c.num_classes, c.dim)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio, c.qk_norm)
                                    for _ in range(c.depth))
        self.final_norm = nn.LayerNorm(c.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 2 * c.dim))
        self.head = nn.Linear(c.dim, self.patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: re-zero after the blanket xavier init above
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        for m in (self.final_ada[1], self.head):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, _, _, _ = x.shape
        pt, ph, pw = self.config.patch
        gt, gh, gw = self.config.grid
        x = x.reshape(b, ch, gt, pt, gh, ph, gw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gt, gh, gw, C, pt, ph, pw)
        return x.reshape(b, gt * gh * gw, self.patch_dim)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        c = self.config
        pt, ph, pw = c.patch
        gt, gh, gw = c.grid
        x = tokens.reshape(b, gt, gh, gw, c.channels, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gt, pt, gh, ph, gw, pw)
        return x.reshape(b, c.channels, c.frames, c.height, c.width)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        expected = (self.config.channels, self.config.frames, self.config.height, self.config.width)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"VideoDiT.forward: x must be (B, *{expected}); got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = self.embed(self.patchify(x)) + self.pos.to(x.dtype)  # (B, N, dim)
        cond = self.t_embed(timestep_embedding(t, self.config.dim).to(h.dtype)) + self.y_embed(y)
        for blk in self.blocks:
            h = blk(h, cond)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        h = self.head(_modulate(self.final_norm(h), shift, scale))
        return self.unpatchify(h)

    def set_attention_timer(self, timer: Optional[Any]) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.timer = timer


def build_model(name_or_config="tiny", **overrides) -> VideoDiT:
    cfg = name_or_config if isinstance(name_or_config, DiTConfig) else get_config(
        name_or_config, **overrides)
    return VideoDiT(cfg)

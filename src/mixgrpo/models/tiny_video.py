"""A tiny text-conditioned video flow model for the moving-shapes world (``tiny-video-unet``).

Clips are ``(B, C, F, H, W)`` in ``[-1, 1]`` (channels first, then frames: the latent layout
:func:`~mixgrpo.inference.generate.noise_shape` gives a config with ``frames``). The cheapest
design that can learn motion from text:

* the tiny U-Net (:mod:`.tiny_unet`) runs on every frame, frames folded into the batch
  (``B F`` images), with the same text conditioning (joint attention to the MiniLM tokens,
  FiLM from the time step and the pooled text);
* every frame's FiLM embedding also gets a learned frame-index embedding, so frame ``k``
  knows where it sits in the clip;
* after each level of the down and up paths, a temporal mixer (GroupNorm, SiLU, a 1-D conv
  over frames at every pixel, zero-initialised residual) passes features between
  neighbouring frames;
* after the 4 px middle, space-time attention: every token of every frame attends to all
  tokens of all frames (5 x 16 = 80 tokens at 32 px), zero-initialised residual. This is
  where "where is the shape in frame 0, and where must it be in frame k" is decided.

At initialisation every temporal unit is the identity and the frame embedding zero, so the
model is the per-frame image U-Net (``v = 0``: its head is zero-initialised). Weight names of
the shared parts are the tiny U-Net's, so an image checkpoint of the same widths loads into it
(``mixgrpo pretrain --init base``) and the model then samples each frame as that image model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tiny_dit import TextCondition
from .tiny_unet import TinyUNet, TinyUNetConfig

__all__ = ["TinyVideoUNet", "TinyVideoUNetConfig"]


@dataclass(frozen=True)
class TinyVideoUNetConfig(TinyUNetConfig):
    """The tiny U-Net's fields (per frame) plus the clip's frames. Smaller default widths than
    the image base: every clip costs ``frames`` images."""

    widths: tuple[int, ...] = (16, 32, 64)
    frames: int = 5  # frames per clip (the moving-shapes world renders 5)
    temporal_kernel: int = 3  # frames each temporal conv sees (odd)
    world: str = "motion"  # the procedural world it generates: picks the prompts and verifier rewards

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd and >= 1, got {self.temporal_kernel}")
        if self.widths[-1] % self.heads:
            raise ValueError(f"the last width {self.widths[-1]} must be divisible by heads {self.heads} "
                             "(space-time attention in the middle)")


class TemporalMix(nn.Module):
    """``h + conv1d_over_frames(silu(norm(h)))`` at every pixel; the conv starts at zero."""

    def __init__(self, width: int, groups: int, kernel: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, width)
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, hh, ww = h.shape
        z = F.silu(self.norm(h)).view(bf // frames, frames, c, hh, ww)
        z = z.permute(0, 3, 4, 2, 1).reshape(-1, c, frames)  # (B H W, C, F)
        z = self.conv(z).view(bf // frames, hh, ww, c, frames).permute(0, 4, 3, 1, 2).reshape(bf, c, hh, ww)
        return h + z


class SpaceTimeAttention(nn.Module):
    """Self-attention over the tokens of all frames of a clip (pre-norm, zero-initialised
    output projection)."""

    def __init__(self, width: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, hh, ww = h.shape
        b, n = bf // frames, frames * hh * ww
        tokens = self.norm(h).view(b, frames, c, hh * ww).permute(0, 1, 3, 2).reshape(b, n, c)
        q, k, v = self.qkv(tokens).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))  # (B, F HW, C)
        return h + out.view(b, frames, hh * ww, c).permute(0, 1, 3, 2).reshape(bf, c, hh, ww)


class TinyVideoUNet(TinyUNet):
    """Velocity model ``v_theta(x_t, t, text)`` on ``(B, C, F, H, W)`` clips in ``[-1, 1]``."""

    def __init__(self, config: TinyVideoUNetConfig | None = None):
        cfg = config or TinyVideoUNetConfig()
        super().__init__(cfg)
        self.frame_emb = nn.Parameter(torch.zeros(cfg.frames, cfg.emb_dim))  # zero: starts as the image U-Net

        def mixer(width: int) -> TemporalMix:
            return TemporalMix(width, cfg.groups, cfg.temporal_kernel)

        self.temporal_down = nn.ModuleList(mixer(w) for w in cfg.widths)
        self.temporal_up = nn.ModuleList(mixer(w) for w in reversed(cfg.widths))
        self.temporal_mid = SpaceTimeAttention(cfg.widths[-1], cfg.heads, cfg.groups)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.channels, cfg.frames, cfg.image_size, cfg.image_size)
        if x.ndim != 5 or x.shape[1:] != expected:
            raise ValueError(f"expected clips of shape (B, {', '.join(map(str, expected))}) (channels, frames, "
                             f"height, width), got {tuple(x.shape)}")
        b, c, f, h, w = x.shape
        emb = self._embed(t, cond, x.dtype)  # (B, E): one per clip, then one per frame
        emb = (emb[:, None] + self.frame_emb.to(emb.dtype)[None]).reshape(b * f, -1)
        per_frame = cond.index(torch.arange(b, device=x.device).repeat_interleave(f))
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)

        def mix(stage: str, level: int, feats: torch.Tensor) -> torch.Tensor:
            if stage == "mid":
                return self.temporal_mid(feats, f)
            return (self.temporal_down if stage == "down" else self.temporal_up)[level](feats, f)

        out = self._trunk(frames, emb, per_frame, mix)  # (B F, C, H, W)
        return out.view(b, f, c, h, w).transpose(1, 2)

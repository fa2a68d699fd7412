"""A small text-conditioned U-Net flow model for the embedded world (~4M parameters).

Why a U-Net: the first embedded base (a patch-4 DiT) painted scattered 4x4 patches, never
shapes. Convolutions at full resolution draw edges and corners; attention at the coarse
scales places objects and binds colours to shapes.

Layout (32 px images, widths 32/64/128)::

    stem conv 3 -> 32
    32 px: 2 ResBlocks                        -> skip     down (stride-2 conv)
    16 px: 2 ResBlocks                        -> skip     down
     8 px: 2 x (ResBlock + joint attention)   -> skip     down
     4 px: ResBlock, joint attention, ResBlock            (the middle)
     8 px / 16 px / 32 px: up (nearest x2 + conv), concat skip, 2 ResBlocks (+ attention at 8 px)
    head GroupNorm, SiLU, conv 32 -> 3 (zero-initialised: the model starts as v = 0)

Every ResBlock is FiLM-modulated by ``emb = MLP(sincos(1000 t)) + Linear(pooled text)``
(its second norm's scale and shift; zero-initialised, so each block starts as identity plus
a conv). Joint attention: image tokens query the concatenation of image and text tokens
(padded text tokens masked), then an MLP, both with residual connections and pre-norms.
A learned null condition replaces the text for classifier-free guidance.

The sampler sees it only through :meth:`TinyUNet.velocity` (``v = eps - x0``), as every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..text import MAX_TOKENS, TEXT_DIM
from .tiny_dit import GuidedVelocity, TextCondition, timestep_embedding

__all__ = ["TinyUNet", "TinyUNetConfig"]

Mix = Callable[[str, int, torch.Tensor], torch.Tensor]  # (stage, level, features) -> features


@dataclass(frozen=True)
class TinyUNetConfig:
    image_size: int = 32  # pixels per side; divisible by 2 ** len(widths)
    channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)  # channels at 32 / 16 / 8 px; the 4 px middle keeps the last
    attention_levels: int = 1  # joint text attention at the last this-many levels (and the middle)
    heads: int = 4
    emb_dim: int = 128  # time + pooled-text embedding driving FiLM
    groups: int = 8  # GroupNorm groups; divides every width
    text_dim: int = TEXT_DIM
    text_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive channel counts, got {self.widths}")
        if self.image_size % (2 ** len(self.widths)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2 ** {len(self.widths)} (one halving per level)")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"every width {self.widths} must be divisible by groups {self.groups}")
        if any(w % self.heads for w in self.widths[len(self.widths) - self.attention_levels :]):
            raise ValueError(f"the attention widths must be divisible by heads {self.heads}")
        if not 0 <= self.attention_levels <= len(self.widths):
            raise ValueError(f"attention_levels must be in [0, {len(self.widths)}], got {self.attention_levels}")
        for name in ("image_size", "channels", "heads", "emb_dim", "groups", "text_dim", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


class ResBlock(nn.Module):
    """``x + conv(FiLM(norm(conv(silu(norm(x))))))`` with a 1x1 skip when channels change."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, text: TextCondition) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class JointAttention(nn.Module):
    """Image tokens attend to ``[image tokens; text tokens]``, then an MLP (pre-norm, residual)."""

    def __init__(self, width: int, heads: int, text_dim: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.text_kv = nn.Linear(text_dim, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, text: TextCondition) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        tk, tv = self.text_kv(text.tokens.to(tokens.dtype)).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        keep = torch.cat([torch.ones(b, h * w, dtype=torch.bool, device=x.device), text.mask.bool()], dim=1)
        out = F.scaled_dot_product_attention(q, torch.cat([k, tk], 2), torch.cat([v, tv], 2),
                                             attn_mask=keep[:, None, None, :])  # (B, heads, HW, C/heads)
        seq = x.flatten(2).transpose(1, 2) + self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        seq = seq + self.mlp(self.norm2(seq))
        return seq.transpose(1, 2).reshape(b, c, h, w)


class TinyUNet(GuidedVelocity, nn.Module):
    """Velocity model ``v_theta(x_t, t, text)`` on ``(B, C, H, W)`` images in ``[-1, 1]``."""

    def __init__(self, config: TinyUNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or TinyUNetConfig()
        widths, levels = cfg.widths, len(cfg.widths)
        attn_from = levels - cfg.attention_levels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.emb_dim, cfg.emb_dim), nn.SiLU(), nn.Linear(cfg.emb_dim, cfg.emb_dim))
        self.pooled_in = nn.Linear(cfg.text_dim, cfg.emb_dim)
        self.null_tokens = nn.Parameter(torch.zeros(1, cfg.text_tokens, cfg.text_dim))
        self.null_pooled = nn.Parameter(torch.zeros(1, cfg.text_dim))
        self.stem = nn.Conv2d(cfg.channels, widths[0], 3, padding=1)

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, cfg.emb_dim, cfg.groups)

        def attn(c: int) -> JointAttention:
            return JointAttention(c, cfg.heads, cfg.text_dim, cfg.groups)

        # One flat list of the units (FSDP shards `blocks`); the forward walks `_plan`.
        blocks: list[nn.Module] = []
        self._down: list[list[int]] = []
        self._up: list[list[int]] = []
        self.downsample = nn.ModuleList()
        self.upsample = nn.ModuleList()

        def add(module: nn.Module) -> int:
            blocks.append(module)
            return len(blocks) - 1

        for i, c in enumerate(widths):
            units = []
            for j in range(2):
                units.append(add(res(c if j else (widths[i - 1] if i else widths[0]), c)))
                if i >= attn_from:
                    units.append(add(attn(c)))
            self._down.append(units)
            self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        c_mid = widths[-1]
        self._mid = [add(res(c_mid, c_mid)), *([add(attn(c_mid))] if cfg.attention_levels else []), add(res(c_mid, c_mid))]
        c_prev = c_mid
        for i in reversed(range(levels)):
            c = widths[i]
            self.upsample.append(nn.Conv2d(c_prev, c_prev, 3, padding=1))
            units = []
            for j in range(2):
                units.append(add(res(c_prev + c if j == 0 else c, c)))
                if i >= attn_from:
                    units.append(add(attn(c)))
            self._up.append(units)
            c_prev = c
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(cfg.groups, widths[0])
        self.head = nn.Conv2d(widths[0], cfg.channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each unit's activations in backward (diffusers' method name)."""
        self.gradient_checkpointing = True

    def _unit(self, index: int, h: torch.Tensor, emb: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        block = self.blocks[index]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, cond, use_reentrant=False)
        return block(h, emb, cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        cfg = self.config
        if x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected images of shape (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        return self._trunk(x, self._embed(t, cond, x.dtype), cond)

    def _embed(self, t: torch.Tensor, cond: TextCondition, dtype: torch.dtype) -> torch.Tensor:
        """``MLP(sincos(1000 t)) + Linear(pooled text)``, ``(B, emb_dim)``: what drives every FiLM."""
        emb_dim = self.config.emb_dim
        return self.time_mlp(timestep_embedding(t, emb_dim).to(dtype)) + self.pooled_in(cond.pooled.to(dtype))

    def _trunk(self, x: torch.Tensor, emb: torch.Tensor, cond: TextCondition, mix: Mix | None = None) -> torch.Tensor:
        """Stem, down path, middle, up path and head on ``(N, C, H, W)``. ``mix(stage, level, h)``,
        when given, runs after each level's units ("down" / "up", level index) and after the
        middle ("mid", 0): the video model's temporal mixing hooks in there."""
        h = self.stem(x)  # (B, w0, H, W)
        skips = []
        for level, (units, down) in enumerate(zip(self._down, self.downsample, strict=True)):
            for u in units:
                h = self._unit(u, h, emb, cond)
            if mix is not None:
                h = mix("down", level, h)
            skips.append(h)
            h = down(h)  # halves H, W
        for u in self._mid:
            h = self._unit(u, h, emb, cond)
        if mix is not None:
            h = mix("mid", 0, h)
        for level, (units, up) in enumerate(zip(self._up, self.upsample, strict=True)):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips.pop()], dim=1)
            for u in units:
                h = self._unit(u, h, emb, cond)
            if mix is not None:
                h = mix("up", level, h)
        return self.head(F.silu(self.norm_out(h)))

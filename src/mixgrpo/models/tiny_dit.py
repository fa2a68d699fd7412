"""A tiny DiT-style flow model for the embedded world (a few million parameters at most).

Image patches and text tokens share one attention (joint attention, as FLUX / SD3's MMDiT
in miniature); the timestep and the pooled text vector modulate every block through
adaptive layer norm with zero-initialised gates (DiT's adaLN-Zero). A learned null
condition replaces the text for classifier-free guidance.

The sampler sees it only through :meth:`TinyDiT.velocity` (``v = eps - x0``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..text import MAX_TOKENS, TEXT_DIM

__all__ = ["GuidedVelocity", "TextCondition", "TinyDiT", "TinyDiTConfig"]


@dataclass(frozen=True)
class TinyDiTConfig:
    image_size: int = 32  # pixels per side of the RGB images the model generates
    channels: int = 3
    patch: int = 4  # 32 / 4 = 8x8 = 64 image tokens
    width: int = 128  # hidden size D
    depth: int = 5  # transformer blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = TEXT_DIM
    text_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        for name in ("image_size", "channels", "patch", "width", "depth", "heads", "text_dim", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TextCondition:
    """Per-sample text condition: ``tokens`` ``(B, L, text_dim)``, ``mask`` ``(B, L)``
    bool, ``pooled`` ``(B, text_dim)``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx: torch.Tensor | slice) -> TextCondition:
        return TextCondition(self.tokens[idx], self.mask[idx], self.pooled[idx])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 t`` (diffusers' timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, hd)
        x = x + gate1.unsqueeze(1) * self.proj(h.transpose(1, 2).reshape(b, n, d))
        h = _modulate(self.norm2(x), shift2, scale2)
        return x + gate2.unsqueeze(1) * self.mlp(h)


class GuidedVelocity:
    """What every embedded model shares: a learned null condition (``null_tokens``,
    ``null_pooled``) and the classifier-free-guided velocity the sampler calls."""

    null_tokens: nn.Parameter
    null_pooled: nn.Parameter

    def null_condition(self, batch: int) -> TextCondition:
        mask = torch.zeros(batch, self.null_tokens.shape[1], dtype=torch.bool, device=self.null_tokens.device)
        mask[:, 0] = True  # one visible (learned) token keeps the attention well defined
        return TextCondition(self.null_tokens.expand(batch, -1, -1), mask, self.null_pooled.expand(batch, -1))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, guidance: float = 1.0) -> torch.Tensor:
        """``v = v_null + w (v_cond - v_null)``; ``w = 1`` is plain conditional sampling
        (one pass), ``w > 1`` runs both branches in one batch (two passes)."""
        if guidance == 1.0:
            return self(x, t, cond)
        null = self.null_condition(x.shape[0])
        both = TextCondition(
            torch.cat([cond.tokens.to(null.tokens.dtype), null.tokens]),
            torch.cat([cond.mask.bool(), null.mask]),
            torch.cat([cond.pooled.to(null.pooled.dtype), null.pooled]),
        )
        v_cond, v_null = self(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return v_null + guidance * (v_cond - v_null)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class TinyDiT(GuidedVelocity, nn.Module):
    """Velocity model ``v_theta(x_t, t, text)`` on ``(B, C, H, W)`` images in ``[-1, 1]``."""

    def __init__(self, config: TinyDiTConfig | None = None):
        super().__init__()
        self.config = cfg = config or TinyDiTConfig()
        grid = cfg.image_size // cfg.patch
        patch_dim = cfg.channels * cfg.patch**2
        self.patch_in = nn.Linear(patch_dim, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, cfg.width) * 0.02)
        self.text_in = nn.Linear(cfg.text_dim, cfg.width)
        self.text_pos = nn.Parameter(torch.randn(1, cfg.text_tokens, cfg.width) * 0.02)
        self.pooled_in = nn.Linear(cfg.text_dim, cfg.width)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        # learned null condition for classifier-free guidance
        self.null_tokens = nn.Parameter(torch.zeros(1, cfg.text_tokens, cfg.text_dim))
        self.null_pooled = nn.Parameter(torch.zeros(1, cfg.text_dim))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(cfg.width, 2 * cfg.width)
        self.patch_out = nn.Linear(cfg.width, patch_dim)
        for layer in (self.ada_out, self.patch_out):  # start as the zero velocity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward (diffusers' method name)."""
        self.gradient_checkpointing = True

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        if x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected images of shape (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        p, g = cfg.patch, cfg.image_size // cfg.patch
        patches = x.reshape(b, cfg.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
        img = self.patch_in(patches) + self.pos  # (B, 64, D)
        txt = self.text_in(cond.tokens.to(img.dtype)) + self.text_pos  # (B, L, D)
        c = self.time_mlp(timestep_embedding(t, cfg.width).to(img.dtype)) + self.pooled_in(cond.pooled.to(img.dtype))
        h = torch.cat([img, txt], dim=1)
        keep = torch.cat([torch.ones(b, g * g, dtype=torch.bool, device=x.device), cond.mask.bool()], dim=1)
        attn_mask = keep[:, None, None, :]  # (B, 1, 1, N): padded text tokens are never attended
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, attn_mask, use_reentrant=False)
            else:
                h = block(h, c, attn_mask)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        out = self.patch_out(_modulate(self.norm_out(h[:, : g * g]), shift, scale))
        return out.reshape(b, g, g, cfg.channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, cfg.channels, cfg.image_size, cfg.image_size)

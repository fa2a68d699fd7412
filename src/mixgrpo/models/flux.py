"""FLUX through diffusers: ``FluxTransformer2DModel`` behind the samplers' ``velocity(x, t, cond)``.

Conventions (diffusers' ``FluxPipeline``, checked against its source):

* latents ``x`` are ``(B, C, H, W)`` VAE latents; the transformer sees them packed into 2x2
  patches, ``(B, H/2 * W/2, 4C)``, with image position ids ``(H/2 * W/2, 3)`` = (0, row, col)
  and all-zero text ids ``(L, 3)``;
* time is the flow time ``t = sigma`` in [0, 1] (the pipeline passes ``timestep / 1000``);
* the output is the flow velocity ``v = eps - x0`` of ``x_t = (1 - t) x0 + t eps``, the same
  convention as every sampler here;
* FLUX.1-dev is guidance-distilled: the guidance scale (3.5 in MixGRPO) goes in through the
  guidance embedding, one pass per step, not classifier-free guidance.

This module is the adapter only: weights load from a local folder, never from a hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .diffusers_io import load_transformer

__all__ = ["FLUX_LORA_TARGETS", "FluxCondition", "FluxVelocityModel", "LatentSpec", "load_flux_transformer",
           "pack_latents", "unpack_latents"]

# attention projections of the double- and single-stream blocks (diffusers' FLUX LoRA scripts)
FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class FluxCondition:
    """Precomputed text conditioning: T5 ``prompt_embeds`` ``(B, L, D)`` and CLIP ``pooled`` ``(B, P)``."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3 or self.pooled.ndim != 2 or len(self.prompt_embeds) != len(self.pooled):
            raise ValueError(f"FluxCondition wants prompt_embeds (B, L, D) and pooled (B, P), got "
                             f"{tuple(self.prompt_embeds.shape)} and {tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return len(self.pooled)

    def index(self, idx: torch.Tensor) -> FluxCondition:
        return FluxCondition(self.prompt_embeds[idx], self.pooled[idx])


@dataclass(frozen=True)
class LatentSpec:
    """What the samplers need to draw initial noise: latent channels and side."""

    channels: int
    image_size: int


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``, FLUX's 2x2 patch tokens."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def _image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxVelocityModel(nn.Module):
    """``velocity(x, t, cond)`` over a diffusers ``FluxTransformer2DModel``.

    Args:
        transformer: the diffusers model (LoRA may be added to it with peft).
        latent_size: latent side ``H = W`` (image side / 8 for the FLUX VAE).
        guidance_scale: the distilled guidance fed to the guidance embedding (FLUX.1-dev);
            ignored by models built with ``guidance_embeds=False`` (FLUX.1-schnell).
    """

    def __init__(self, transformer: nn.Module, latent_size: int, guidance_scale: float = 3.5):
        super().__init__()
        self.transformer = transformer
        channels = transformer.config.in_channels // 4
        self.config = LatentSpec(channels=channels, image_size=latent_size)
        self.guidance_scale = guidance_scale

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: FluxCondition, guidance: float = 1.0) -> torch.Tensor:
        if guidance != 1.0:
            raise ValueError("FLUX.1 is guidance-distilled: set its guidance_scale, not classifier-free guidance "
                             f"(sampler.guidance must be 1, got {guidance})")
        b, _, h, w = x.shape
        dtype = self.transformer.dtype
        g = None
        if self.transformer.config.guidance_embeds:
            g = torch.full((b,), self.guidance_scale, device=x.device, dtype=dtype)
        out = self.transformer(
            hidden_states=pack_latents(x).to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=t.to(dtype),
            img_ids=_image_ids(h, w, x.device, dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device, dtype=dtype),
            guidance=g,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: FluxCondition) -> torch.Tensor:
        return self.velocity(x, t, cond)


def load_flux_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``FluxTransformer2DModel`` from a local pipeline or transformer folder (safetensors only)."""
    return load_transformer(folder, "FluxTransformer2DModel", dtype)

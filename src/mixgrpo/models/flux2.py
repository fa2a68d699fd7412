"""FLUX.2 through diffusers: ``Flux2Transformer2DModel`` behind ``velocity(x, t, cond, guidance)``.

Conventions (diffusers' ``Flux2Pipeline``, checked against its source):

* latents ``x`` are ``(B, 4C, H/2, W/2)``: the VAE's ``(B, C, H, W)`` latents cut into 2x2 patches
  (channel ``4c + 2i + j`` holds patch pixel ``(i, j)`` of channel ``c``) and normalised by the
  VAE's BatchNorm running statistics. That is the space the pipeline draws its noise in and the
  transformer works in; the tokens are its pixels in row-major order, ``(B, H/2 * W/2, 4C)``, with
  position ids ``(0, row, col, 0)`` and text ids ``(0, 0, 0, l)``;
* time is the flow time ``t = sigma`` in [0, 1] (the pipeline passes ``timestep / 1000``; the
  model scales by 1000 inside); the output is the velocity ``v = eps - x0``;
* FLUX.2-dev is guidance-distilled: the guidance scale (the pipeline's default 4) goes in through
  the guidance embedding, one pass per step; there is no classifier-free guidance;
* text: Mistral-3 hidden states of layers 10, 20 and 30 side by side, ``(B, L, 3D)``, padded to
  the sequence length (512 by default) and attended in full, without a mask, as the pipeline does.

Text-to-image only: the pipeline's reference images (``image=``, editing) and its prompt
upsampling are not part of this adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .diffusers_io import load_transformer
from .flux import LatentSpec

__all__ = ["FLUX2_LORA_TARGETS", "Flux2Condition", "Flux2VelocityModel", "load_flux2_transformer", "position_ids"]

# attention projections of the double-stream blocks and the single-stream blocks' fused
# QKV + MLP input (their fused output shares the name "to_out" with the double blocks' list)
FLUX2_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "to_qkv_mlp_proj"]


@dataclass
class Flux2Condition:
    """Precomputed text conditioning: Mistral-3 ``prompt_embeds`` ``(B, L, D)``."""

    prompt_embeds: torch.Tensor

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"Flux2Condition wants prompt_embeds (B, L, D), got {tuple(self.prompt_embeds.shape)}")

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def index(self, idx: torch.Tensor) -> Flux2Condition:
        return Flux2Condition(self.prompt_embeds[idx])


def position_ids(height: int, width: int, text_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ids ``(H W, 4)`` = (0, row, col, 0) and text ids ``(L, 4)`` = (0, 0, 0, l)."""
    one = torch.arange(1)
    image = torch.cartesian_prod(one, torch.arange(height), torch.arange(width), one)
    text = torch.cartesian_prod(one, one, one, torch.arange(text_length))
    return image.to(device), text.to(device)


class Flux2VelocityModel(nn.Module):
    """``velocity(x, t, cond)`` over a diffusers ``Flux2Transformer2DModel``.

    Args:
        transformer: the diffusers model (LoRA may be added to it with peft).
        latent_size: side of the patchified latents (image side / 16 for the FLUX.2 VAE).
        guidance_scale: the distilled guidance fed to the guidance embedding (ignored by
            models built with ``guidance_embeds=False``).
    """

    def __init__(self, transformer: nn.Module, latent_size: int, guidance_scale: float = 4.0):
        super().__init__()
        self.transformer = transformer
        self.config = LatentSpec(channels=transformer.config.in_channels, image_size=latent_size)
        self.guidance_scale = guidance_scale

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Flux2Condition, guidance: float = 1.0) -> torch.Tensor:
        if guidance != 1.0:
            raise ValueError("FLUX.2 is guidance-distilled: set its guidance scale (model.flux_guidance), not "
                             f"classifier-free guidance (sampler.guidance must be 1, got {guidance})")
        b, c, h, w = x.shape
        dtype = self.transformer.dtype
        image_ids, text_ids = position_ids(h, w, cond.prompt_embeds.shape[1], x.device)
        out = self.transformer(
            hidden_states=x.reshape(b, c, h * w).permute(0, 2, 1).to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            timestep=t.to(dtype),
            guidance=torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32),
            img_ids=image_ids,
            txt_ids=text_ids,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Flux2Condition) -> torch.Tensor:
        return self.velocity(x, t, cond)


def load_flux2_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``Flux2Transformer2DModel`` from a local pipeline or transformer folder (safetensors only)."""
    return load_transformer(folder, "Flux2Transformer2DModel", dtype)

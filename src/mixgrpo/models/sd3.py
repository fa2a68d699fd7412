"""SD3 / SD3.5 through diffusers: ``SD3Transformer2DModel`` behind ``velocity(x, t, cond)``.

Conventions (diffusers' ``StableDiffusion3Pipeline``): latents ``(B, C, H, W)`` go in
unpacked; the timestep is ``1000 t`` (the scheduler's sigmas times 1000, passed as is); the
output is the flow velocity ``v = eps - x0``. Classifier-free guidance is real CFG with
negative-prompt embeddings: ``v = v_uncond + s (v_text - v_uncond)``, two passes per step
(``count_model_passes(cfg=True)`` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .diffusers_io import load_transformer
from .flux import LatentSpec

__all__ = ["SD3_LORA_TARGETS", "SD3Condition", "SD3VelocityModel", "load_sd3_transformer"]

SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class SD3Condition:
    """Precomputed text conditioning (CLIP-L/G + T5 joint): ``prompt_embeds`` ``(B, L, D)``,
    ``pooled`` ``(B, P)``, and the negative prompt's, needed only for CFG."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pooled)

    def index(self, idx: torch.Tensor) -> SD3Condition:
        neg = None if self.negative_embeds is None else self.negative_embeds[idx]
        neg_pooled = None if self.negative_pooled is None else self.negative_pooled[idx]
        return SD3Condition(self.prompt_embeds[idx], self.pooled[idx], neg, neg_pooled)


class SD3VelocityModel(nn.Module):
    """``velocity(x, t, cond, guidance)`` over a diffusers ``SD3Transformer2DModel``."""

    def __init__(self, transformer: nn.Module, latent_size: int):
        super().__init__()
        self.transformer = transformer
        self.config = LatentSpec(channels=transformer.config.in_channels, image_size=latent_size)

    def _call(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.dtype
        out = self.transformer(hidden_states=x.to(dtype), timestep=(1000 * t).to(dtype),
                               encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
                               return_dict=False)[0]
        return out.to(x.dtype)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: SD3Condition, guidance: float = 1.0) -> torch.Tensor:
        if guidance == 1.0:
            return self._call(x, t, cond.prompt_embeds, cond.pooled)
        if cond.negative_embeds is None or cond.negative_pooled is None:
            raise ValueError("classifier-free guidance needs negative-prompt embeddings; precompute them or use guidance 1")
        both = self._call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond.negative_embeds, cond.prompt_embeds]),
                          torch.cat([cond.negative_pooled, cond.pooled]))
        uncond, text = both.chunk(2)
        return uncond + guidance * (text - uncond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: SD3Condition) -> torch.Tensor:
        return self.velocity(x, t, cond)


def load_sd3_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An ``SD3Transformer2DModel`` from a local pipeline or transformer folder (safetensors only)."""
    return load_transformer(folder, "SD3Transformer2DModel", dtype)

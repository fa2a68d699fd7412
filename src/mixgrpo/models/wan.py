"""Wan (text-to-video) through diffusers: ``WanTransformer3DModel`` behind ``velocity(x, t, cond, guidance)``.

Conventions (diffusers' ``WanPipeline``, checked against its source):

* latents ``x`` are video latents ``(B, C, F, H, W)``: ``F = (frames - 1) / 4 + 1`` latent frames
  (the VAE compresses time by 4, keeping the first frame alone), ``H = W = side / 8`` (Wan2.2
  TI2V-5B's VAE: 16), normalised per channel by the VAE's ``latents_mean`` / ``latents_std``.
  The transformer patchifies them itself (1x2x2 patches, 3-D RoPE), so they go in as they are;
* time is the flow time ``t = sigma`` in [0, 1]; the transformer takes the scheduler's timestep
  ``1000 t`` (float32, as the pipeline passes it); the output is the velocity ``v = eps - x0``.
  Wan2.2 TI2V-5B's pipeline (``expand_timesteps``) gives every latent token its own timestep;
  for text-to-video they are all the same, passed the same way;
* guidance is true classifier-free guidance with the negative prompt's embeddings, two passes
  (text, then negative) as the pipeline runs them: ``v = u + s (c - u)``; guidance 1 is one pass
  and needs no negative;
* text: UMT5 last hidden states ``(B, L, D)`` with the padding after each prompt set to zero
  and attended without a mask (the pipeline's form), ``L`` = 512 by default.

Refused with one line: Wan2.2 A14B's two experts (``transformer_2`` switched in below
``boundary_ratio``), image-conditioned transformers (``image_dim``: image-to-video).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .diffusers_io import load_transformer

__all__ = [
    "WAN_LORA_TARGETS",
    "VideoLatentSpec",
    "WanCondition",
    "WanVelocityModel",
    "check_wan_pipeline",
    "latent_frames",
    "load_wan_transformer",
]

# the attention projections of the self- and cross-attention blocks (diffusers' Wan LoRA scripts)
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TIMESTEPS = 1000  # the schedulers' num_train_timesteps: the transformer's timestep is 1000 t


@dataclass(frozen=True)
class VideoLatentSpec:
    """What the samplers need to draw initial noise ``(channels, frames, image_size, image_size)``:
    latent channels, latent frames and latent side."""

    channels: int
    image_size: int
    frames: int


@dataclass
class WanCondition:
    """Precomputed text conditioning: UMT5 ``prompt_embeds`` ``(B, L, D)`` and the negative
    prompt's, needed only for CFG."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"WanCondition wants prompt_embeds (B, L, D), got {tuple(self.prompt_embeds.shape)}")

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def index(self, idx: torch.Tensor) -> WanCondition:
        neg = None if self.negative_embeds is None else self.negative_embeds[idx]
        return WanCondition(self.prompt_embeds[idx], neg)


class WanVelocityModel(nn.Module):
    """``velocity(x, t, cond, guidance)`` over a diffusers ``WanTransformer3DModel``.

    Args:
        transformer: the diffusers model (LoRA may be added to it with peft).
        latent_size: latent side ``H = W`` (pixel side / the VAE's spatial factor).
        frames: latent frames ``F``.
        expand_timesteps: one timestep per latent token (Wan2.2 TI2V-5B's pipeline flag).
    """

    def __init__(self, transformer: nn.Module, latent_size: int, frames: int, expand_timesteps: bool = False):
        super().__init__()
        if transformer.config.image_dim is not None:
            raise ValueError("this WanTransformer3DModel takes image embeddings (image_dim set: image-to-video); "
                             "model.kind=wan trains text-to-video: pass a WanPipeline (T2V) folder")
        self.transformer = transformer
        self.config = VideoLatentSpec(channels=transformer.config.in_channels, image_size=latent_size, frames=frames)
        self.expand_timesteps = expand_timesteps

    def _call(self, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds.to(x.dtype),
                                return_dict=False)[0]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: WanCondition, guidance: float = 1.0) -> torch.Tensor:
        b, _, f, h, w = x.shape
        timestep = t.float() * TIMESTEPS  # the scheduler's sigma * 1000, in float32
        if self.expand_timesteps:
            p_t, p_h, p_w = self.transformer.config.patch_size
            timestep = timestep[:, None].expand(b, (f // p_t) * (h // p_h) * (w // p_w))
        hidden = x.to(self.transformer.dtype)
        v = self._call(hidden, timestep, cond.prompt_embeds)
        if guidance != 1.0:
            if cond.negative_embeds is None:
                raise ValueError("classifier-free guidance needs negative-prompt embeddings; preprocess them "
                                 "(`mixgrpo preprocess` stores them for Wan) or use guidance 1")
            u = self._call(hidden, timestep, cond.negative_embeds)
            v = u + guidance * (v - u)
        return v.to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: WanCondition) -> torch.Tensor:
        return self.velocity(x, t, cond)


def check_wan_pipeline(folder: str | Path) -> dict:
    """The ``model_index.json`` of a text-to-video ``WanPipeline`` folder with one transformer,
    or one line saying what it is instead and what to pass."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json); pass a WanPipeline folder")
    meta = json.loads(index.read_text())
    name = meta.get("_class_name")
    if name != "WanPipeline":
        raise ValueError(f"{index} describes {name!r}; model.kind=wan takes a text-to-video WanPipeline folder "
                         "(image-to-video, VACE and animate pipelines are not supported)")
    expert = meta.get("transformer_2")
    if (isinstance(expert, list) and expert[0] is not None) or meta.get("boundary_ratio") is not None:
        raise ValueError(f"{folder} is a two-expert Wan2.2 pipeline (transformer_2 below boundary_ratio "
                         f"{meta.get('boundary_ratio')}), which is not supported yet: use Wan2.1-T2V or Wan2.2-TI2V-5B")
    return meta


def latent_frames(frames: int, temporal: int = 4) -> int:
    """Latent frames of a ``frames``-frame video (``(frames - 1) / temporal + 1``), or one line
    naming the frame counts Wan takes."""
    if frames < 1 or (frames - 1) % temporal:
        low = max(1, (frames - 1) // temporal * temporal + 1)
        raise ValueError(f"Wan takes {temporal}k + 1 frames (its VAE compresses time by {temporal}, keeping the first "
                         f"frame alone), got {frames}: use {low} or {low + temporal} (81 is Wan's default)")
    return (frames - 1) // temporal + 1


def load_wan_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``WanTransformer3DModel`` from a local pipeline or transformer folder (safetensors only)."""
    return load_transformer(folder, "WanTransformer3DModel", dtype)

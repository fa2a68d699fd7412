"""Qwen-Image through diffusers: ``QwenImageTransformer2DModel`` behind ``velocity(x, t, cond, guidance)``.

Conventions (diffusers' ``QwenImagePipeline``, checked against its source):

* latents ``x`` are ``(B, C, H, W)``: the VAE's video latents ``(B, C, 1, H, W)`` with the single
  frame squeezed out. The transformer sees FLUX's 2x2 patch tokens ``(B, H/2 * W/2, 4C)`` and, for
  its RoPE, ``img_shapes = [[(1, H/2, W/2)]]`` per sample;
* time is the flow time ``t = sigma`` in [0, 1] (the pipeline passes ``timestep / 1000``; the
  model scales by 1000 inside); the output is the velocity ``v = eps - x0``;
* text: Qwen2.5-VL's last hidden states after the chat template's first 34 tokens, ``(B, L, D)``,
  with a 0/1 mask, prompts padded with zeros to the longest. Each call trims the batch to its
  longest prompt and drops an all-ones mask, as ``encode_prompt`` leaves them, so a batch gives
  what the pipeline gives for the same prompts;
* guidance is true classifier-free guidance with negative-prompt embeddings, two passes, and the
  pipeline's rescale: ``c = u + s (v - u)``, then ``c ||v|| / ||c||`` per token (norm over the
  ``4C`` packed channels). Guidance 1 is one pass and needs no negative.

Guidance-distilled variants (``guidance_embeds=True``) are refused: diffusers' transformer cannot
run its own guidance branch (it passes one argument too many to the time embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .diffusers_io import load_transformer
from .flux import LatentSpec, pack_latents, unpack_latents

__all__ = ["QWEN_IMAGE_LORA_TARGETS", "QwenImageCondition", "QwenImageVelocityModel", "load_qwen_image_transformer"]

# the attention projections of the dual-stream blocks, as for FLUX
QWEN_IMAGE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class QwenImageCondition:
    """Precomputed text conditioning: ``prompt_embeds`` ``(B, L, D)`` and ``prompt_mask`` ``(B, L)``
    (1 = token, 0 = padding), and the negative prompt's, needed only for CFG."""

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3 or self.prompt_mask.shape != self.prompt_embeds.shape[:2]:
            raise ValueError(f"QwenImageCondition wants prompt_embeds (B, L, D) and prompt_mask (B, L), got "
                             f"{tuple(self.prompt_embeds.shape)} and {tuple(self.prompt_mask.shape)}")

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def index(self, idx: torch.Tensor) -> QwenImageCondition:
        neg = None if self.negative_embeds is None else self.negative_embeds[idx]
        neg_mask = None if self.negative_mask is None else self.negative_mask[idx]
        return QwenImageCondition(self.prompt_embeds[idx], self.prompt_mask[idx], neg, neg_mask)


def _trim(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the padding every row shares; ``None`` for a mask with no padding left (the pipeline's form)."""
    keep = mask.bool()
    used = keep.any(0).nonzero()
    length = int(used.max()) + 1 if used.numel() else embeds.shape[1]
    keep = keep[:, :length]
    return embeds[:, :length], None if bool(keep.all()) else keep


class QwenImageVelocityModel(nn.Module):
    """``velocity(x, t, cond, guidance)`` over a diffusers ``QwenImageTransformer2DModel``.

    Args:
        transformer: the diffusers model (LoRA may be added to it with peft).
        latent_size: latent side ``H = W`` (image side / 8 for the Qwen-Image VAE).
    """

    def __init__(self, transformer: nn.Module, latent_size: int):
        super().__init__()
        if transformer.config.guidance_embeds:
            raise ValueError("this QwenImageTransformer2DModel has guidance_embeds=True, which diffusers cannot run; "
                             "use a Qwen-Image checkpoint without guidance embeddings")
        self.transformer = transformer
        self.config = LatentSpec(channels=transformer.config.in_channels // 4, image_size=latent_size)

    def _call(self, tokens: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
              shapes: list) -> torch.Tensor:
        dtype = self.transformer.dtype
        embeds, mask = _trim(embeds, mask)
        return self.transformer(hidden_states=tokens, timestep=t.to(dtype), encoder_hidden_states=embeds.to(dtype),
                                encoder_hidden_states_mask=mask, img_shapes=shapes, return_dict=False)[0]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: QwenImageCondition, guidance: float = 1.0) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = pack_latents(x).to(self.transformer.dtype)
        shapes = [[(1, h // 2, w // 2)]] * b
        text = self._call(tokens, t, cond.prompt_embeds, cond.prompt_mask, shapes)
        if guidance != 1.0:
            if cond.negative_embeds is None or cond.negative_mask is None:
                raise ValueError("classifier-free guidance needs negative-prompt embeddings; preprocess them "
                                 "(`mixgrpo preprocess` stores them for Qwen-Image) or use guidance 1")
            uncond = self._call(tokens, t, cond.negative_embeds, cond.negative_mask, shapes)
            both = uncond + guidance * (text - uncond)
            text = both * (text.norm(dim=-1, keepdim=True) / both.norm(dim=-1, keepdim=True))
        return unpack_latents(text, h, w).to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: QwenImageCondition) -> torch.Tensor:
        return self.velocity(x, t, cond)


def load_qwen_image_transformer(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``QwenImageTransformer2DModel`` from a local pipeline or transformer folder (safetensors only)."""
    return load_transformer(folder, "QwenImageTransformer2DModel", dtype)

"""Stable Diffusion 1.x / 2.x and SDXL through diffusers: ``UNet2DConditionModel`` behind
``velocity(y, tau, cond, guidance)`` on the flow path of :mod:`mixgrpo.core.vp`.

Conventions (diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` sampled with
``DDIMScheduler.from_config(<the pipeline's scheduler config>)``, checked against their source):

* the UNet is a VP model, ``x = a x0 + s eps`` at training timestep ``k`` with
  ``a^2 = alphas_cumprod[k]``, predicting ``eps`` or ``v``. We sample ``y = x / (a + s)`` at flow
  time ``tau = s / (a + s)``: the velocity runs the UNet at ``x = c(tau) y`` and the (fractional)
  timestep whose flow time is ``tau``, and turns its prediction into ``v = eps_hat - x0_hat``.
  Euler on this path is DDIM with eta 0, exactly;
* time grid (:meth:`SDVelocityModel.time_grid`): the flow times of DDIM's timesteps
  (``timestep_spacing`` leading or trailing, ``steps_offset``), ending at the final alpha's
  time: 0 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``'s (about 0.03 for SD1.5). The
  samplers' ``sampler.shift`` does not apply. ``StableDiffusionPipeline`` rewrites an outdated
  scheduler config (``steps_offset`` != 1 becomes 1, ``clip_sample`` becomes false); so do we;
* DDIM starts from ``x_T ~ N(0, I)``: ``y_0 = x_T / c(tau_0)``
  (:meth:`~SDVelocityModel.initial_noise_scale`); the image is decoded from
  ``x = c(tau_end) y_end`` (:meth:`~SDVelocityModel.final_latents`);
* the UNet gets its timestep in float32 (bfloat16 cannot hold 981); a flow time that equals a
  table entry in float32 is that entry's integer timestep, as the pipeline passes it;
* classifier-free guidance is the pipelines': one batched pass over ``[negative, prompt]``, then
  ``out = u + s (c - u)`` on the UNet's output (the velocity is affine in it, so this is CFG on
  the velocity too). Guidance 1 is one pass and needs no negative;
* SDXL (``addition_embed_type="text_time"``): ``added_cond_kwargs`` holds the pooled embedding of
  text_encoder_2 and the time ids ``(H, W, 0, 0, H, W)`` of the image size (the pipeline's
  defaults: original size = target size, no crop), for the negative prompt too.

Refused, each in one line naming the fix: prediction type ``sample``, ``linspace`` timestep
spacing (DDIM then evaluates the model off the time it stepped to), ``clip_sample`` and
``thresholding`` (they clip ``x0_hat``, which no flow step does), epsilon prediction with zero
terminal SNR (``x0_hat`` divides by 0), and UNets that need more than text: inpainting (extra
input channels), LCM's guidance embedding, class labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.vp import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    VPSchedule,
    velocity_from_prediction,
    vp_coefficients,
)
from .diffusers_io import load_transformer
from .flux import LatentSpec

__all__ = ["SD_LORA_TARGETS", "SDCondition", "SDVelocityModel", "VPSchedule", "load_sd_unet", "load_vp_schedule"]

# the attention projections of the UNet's transformer blocks (self- and cross-attention)
SD_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def load_vp_schedule(pipeline_dir: str | Path) -> VPSchedule:
    """The DDIM schedule of the pipeline in ``pipeline_dir``: ``DDIMScheduler.from_config`` of its
    scheduler config, after the rewrites ``StableDiffusionPipeline`` makes (see the module doc)."""
    from diffusers import DDIMScheduler

    pipeline_dir = Path(pipeline_dir)
    path = pipeline_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass the pipeline folder (its scheduler config sets the DDIM "
                                "timesteps)")
    config = json.loads(path.read_text())
    index = pipeline_dir / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusionPipeline":
        config.update(steps_offset=1, clip_sample=False)  # what its __init__ does to any other value
    ddim = DDIMScheduler.from_config(config)
    c = ddim.config
    if c.clip_sample or c.thresholding:
        key = "clip_sample" if c.clip_sample else "thresholding"
        raise ValueError(f"{path}: DDIM with {key}=true clips its x0 prediction, which no flow step does; set "
                         f'"{key}": false there (latent models never need it)')
    if c.timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"{path}: timestep_spacing {c.timestep_spacing!r} is not one DDIM chain (DDIM evaluates the "
                         'model off the time it stepped to); set "timestep_spacing" to "leading" or "trailing" there')
    if c.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{path}: prediction_type {c.prediction_type!r} is not supported; the sd adapter takes "
                         f"models predicting {' or '.join(PREDICTION_TYPES)}")
    alphas = ddim.alphas_cumprod.double()
    if c.prediction_type == "epsilon" and float(alphas[-1]) == 0.0:
        raise ValueError(f"{path}: zero terminal SNR with epsilon prediction divides x0 by 0 at the noisiest "
                         "timestep; use a v-prediction model or rescale_betas_zero_snr: false")
    return VPSchedule(alphas, c.prediction_type, c.timestep_spacing, int(c.steps_offset),
                      float(ddim.final_alpha_cumprod))


@dataclass
class SDCondition:
    """Precomputed text conditioning: CLIP ``prompt_embeds`` ``(B, 77, D)``; SDXL also ``pooled``
    ``(B, P)`` (text_encoder_2's projection); the negative prompt's, needed only for CFG."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"SDCondition wants prompt_embeds (B, L, D), got {tuple(self.prompt_embeds.shape)}")

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def index(self, idx: torch.Tensor) -> SDCondition:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return SDCondition(self.prompt_embeds[idx], pick(self.pooled), pick(self.negative_embeds),
                           pick(self.negative_pooled))


class SDVelocityModel(nn.Module):
    """``velocity(y, tau, cond, guidance)`` over a diffusers ``UNet2DConditionModel``.

    Args:
        unet: the diffusers model (LoRA may be added to it with peft).
        latent_size: latent side (image side / 8 for the SD VAEs).
        schedule: the pipeline's DDIM schedule (:func:`load_vp_schedule`).
        image_size: pixels per side (SDXL's time ids).
    """

    def __init__(self, unet: nn.Module, latent_size: int, schedule: VPSchedule, image_size: int):
        super().__init__()
        c = unet.config
        if c.in_channels != c.out_channels:
            raise ValueError(f"this UNet takes {c.in_channels} input channels for {c.out_channels} output channels (an "
                             "inpainting or image-conditioned model); use a text-to-image Stable Diffusion UNet")
        if c.time_cond_proj_dim is not None or c.class_embed_type is not None or c.addition_embed_type not in (
                None, "text_time"):
            raise ValueError("this UNet is conditioned on more than text and time (a guidance embedding, class labels "
                             "or image embeddings); use a text-to-image Stable Diffusion or SDXL UNet")
        # named as the other adapters name their network, so checkpoints, loaders and exports
        # treat every kind alike
        self.transformer = unet
        self.config = LatentSpec(channels=c.in_channels, image_size=latent_size)
        self.schedule = schedule
        self.xl = c.addition_embed_type == "text_time"
        self.image_size = image_size
        self.register_buffer("time_ids", torch.tensor([[image_size, image_size, 0, 0, image_size, image_size]],
                                                       dtype=torch.float32), persistent=False)

    # the samplers' hooks (mixgrpo.inference.generate): grid, start and end of the VP path
    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The flow times of DDIM's ``num_steps`` timesteps (see the module doc)."""
        return self.schedule.grid(num_steps)

    def initial_noise_scale(self, grid: torch.Tensor) -> float:
        """``1 / c(tau_0)``: DDIM's ``x_T ~ N(0, I)`` as a sample ``y_0`` of the flow path."""
        return float(1.0 / vp_coefficients(float(grid[0]))[2])

    def final_latents(self, y: torch.Tensor) -> torch.Tensor:
        """The VAE latents ``x = c(tau_end) y`` a final sample stands for."""
        return y * float(vp_coefficients(self.schedule.end_time)[2])

    def _predict(self, x: torch.Tensor, steps: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        dtype = self.transformer.dtype
        added = None
        if self.xl:
            if pooled is None:
                raise ValueError("an SDXL UNet needs the pooled text embedding; preprocess the prompts with the SDXL "
                                 "pipeline (`mixgrpo preprocess`)")
            added = {"text_embeds": pooled.to(dtype), "time_ids": self.time_ids.expand(len(x), -1)}
        return self.transformer(x.to(dtype), steps, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added,
                                return_dict=False)[0]

    def velocity(self, y: torch.Tensor, t: torch.Tensor, cond: SDCondition, guidance: float = 1.0) -> torch.Tensor:
        c = vp_coefficients(t.to(torch.promote_types(y.dtype, torch.float32)))[2].view(-1, *([1] * (y.ndim - 1)))
        x = c * y
        steps = self.schedule.timesteps(t)
        if guidance == 1.0:
            out = self._predict(x, steps, cond.prompt_embeds, cond.pooled)
        else:
            if cond.negative_embeds is None or (self.xl and cond.negative_pooled is None):
                raise ValueError("classifier-free guidance needs negative-prompt embeddings; preprocess them "
                                 "(`mixgrpo preprocess` stores them for Stable Diffusion) or use guidance 1")
            pooled = torch.cat([cond.negative_pooled, cond.pooled]) if self.xl else None
            both = self._predict(torch.cat([x, x]), torch.cat([steps, steps]),
                                 torch.cat([cond.negative_embeds, cond.prompt_embeds]), pooled)
            uncond, text = both.chunk(2)
            out = uncond + guidance * (text - uncond)
        return velocity_from_prediction(y, t, out, self.schedule.prediction_type).to(y.dtype)

    def forward(self, y: torch.Tensor, t: torch.Tensor, cond: SDCondition) -> torch.Tensor:
        return self.velocity(y, t, cond)


def load_sd_unet(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``UNet2DConditionModel`` from a local pipeline or UNet folder (safetensors only)."""
    return load_transformer(folder, "UNet2DConditionModel", dtype, subfolder="unet")

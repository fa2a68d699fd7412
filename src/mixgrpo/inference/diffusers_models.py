"""FLUX / SD3 for inference: the velocity model, its VAE decoder, its scheduler's time shift and
prompt conditions from `mixgrpo preprocess` folders, loaded from local diffusers folders.

Training (:mod:`mixgrpo.train.backends`) builds its FLUX/SD3 backend from the same pieces, so
``sample`` and ``eval`` see the model exactly as the trainer did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DiffusersModel", "EmbeddingConditions", "encode_or_load_embeddings", "load_diffusers_model",
           "scheduler_shift", "to_device", "vae_decoder"]

TRANSFORMERS = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}


def to_device(cond: Any, device: torch.device | str) -> Any:
    """A condition dataclass with every tensor field moved to ``device``."""
    moved = {f.name: getattr(cond, f.name).to(device) for f in dataclasses.fields(cond)
             if torch.is_tensor(getattr(cond, f.name))}
    return dataclasses.replace(cond, **moved)


def scheduler_shift(pipeline_dir: Path, latent_size: int) -> float:
    """The shift ``s`` of ``t' = s t / (1 + (s - 1) t)`` the pipeline's scheduler uses.

    SD3: the config's ``shift``. FLUX (``use_dynamic_shifting``): ``mu`` interpolated
    linearly in the image token count ``(latent / 2)^2`` between ``base_shift`` at
    ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len`` (diffusers'
    ``calculate_shift``), then ``s = exp(mu)`` (``s = mu`` for ``time_shift_type: linear``)."""
    path = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass the pipeline folder, or give the time shift as a number")
    c = json.loads(path.read_text())
    if not c.get("use_dynamic_shifting"):
        return float(c.get("shift", 1.0))
    seq = (latent_size // 2) ** 2
    lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    mu = c.get("base_shift", 0.5) + (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) * (seq - lo) / (hi - lo)
    return mu if c.get("time_shift_type") == "linear" else math.exp(mu)


def vae_decoder(pipeline_dir: Path, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``latents -> images (B, 3, H, W) in [0, 1]`` with the pipeline's VAE, and its downsampling factor."""
    from diffusers import AutoencoderKL

    folder = Path(pipeline_dir) / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no VAE in {pipeline_dir} (vae/config.json missing); pass the pipeline folder")
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval().requires_grad_(False)
    vae.to(device)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode((latents / scale + shift).to(device, vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    return decode, 2 ** (len(vae.config.block_out_channels) - 1)


class EmbeddingConditions:
    """``prompts -> condition`` from a `mixgrpo preprocess` folder; a prompt it lacks is one line
    naming the folder and the fix."""

    def __init__(self, folder: str | Path, make: Callable[..., Any], *, expect_dim: int, expect_pooled: int):
        from ..text.preprocess import load_embeddings

        self.folder = str(folder)
        self.prompts, self.tensors, _ = load_embeddings(folder, expect_dim=expect_dim, expect_pooled=expect_pooled)
        self.row = {p: i for i, p in enumerate(self.prompts)}
        self.make = make

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.row

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in prompts if p not in self.row]

    def __call__(self, prompts: Sequence[str]):
        missing = self.missing(prompts)
        if missing:
            raise ValueError(f"prompt {missing[0]!r} has no embedding in {self.folder}; "
                             "preprocess it first (`mixgrpo preprocess`)")
        idx = torch.tensor([self.row[p] for p in prompts])
        return self.make(**{k: v[idx] for k, v in self.tensors.items()})


@dataclass
class DiffusersModel:
    """What sampling needs of a FLUX/SD3 pipeline folder."""

    kind: str  # flux | sd3
    folder: Path  # the pipeline folder
    transformer: nn.Module  # the diffusers transformer (LoRA goes here)
    model: nn.Module  # velocity(x, t, cond, guidance) over it
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_size: int
    lora_targets: list[str]

    def make_condition(self, **tensors: torch.Tensor):
        if self.kind == "flux":
            from ..models.flux import FluxCondition

            return FluxCondition(tensors["prompt_embeds"], tensors["pooled"])
        from ..models.sd3 import SD3Condition

        return SD3Condition(tensors["prompt_embeds"], tensors["pooled"], tensors.get("negative_embeds"),
                            tensors.get("negative_pooled"))

    def conditions(self, embeddings: str | Path) -> EmbeddingConditions:
        c = self.transformer.config
        return EmbeddingConditions(embeddings, self.make_condition, expect_dim=c.joint_attention_dim,
                                   expect_pooled=c.pooled_projection_dim)

    def velocity_model(self, transformer: nn.Module) -> nn.Module:
        """Another transformer (a fine-tune) behind the same adapter settings."""
        from ..models.flux import FluxVelocityModel
        from ..models.sd3 import SD3VelocityModel

        if self.kind == "flux":
            return FluxVelocityModel(transformer, self.latent_size, self.model.guidance_scale)
        return SD3VelocityModel(transformer, self.latent_size)


def pipeline_kind(folder: Path) -> str:
    """``flux`` or ``sd3`` from a pipeline folder's ``model_index.json``."""
    from ..text.preprocess import pipeline_class

    return PIPELINES[pipeline_class(folder)]


def load_transformer_of(kind: str, folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from ..models.diffusers_io import load_transformer

    return load_transformer(folder, TRANSFORMERS[kind], dtype)


def load_diffusers_model(kind: str, folder: str | Path, *, image_size: int, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, flux_guidance: float = 3.5) -> DiffusersModel:
    """The transformer of the pipeline in ``folder`` behind ``velocity``, its VAE decoder and
    latent size for ``image_size`` pixels."""
    from ..models.flux import FLUX_LORA_TARGETS, FluxVelocityModel
    from ..models.sd3 import SD3_LORA_TARGETS, SD3VelocityModel

    if kind not in TRANSFORMERS:
        raise ValueError(f"model kind must be one of {', '.join(TRANSFORMERS)}, got {kind!r}")
    folder = Path(folder)
    transformer = load_transformer_of(kind, folder, dtype)
    decode, factor = vae_decoder(folder, torch.device(device))
    if image_size % (2 * factor):
        raise ValueError(f"image size {image_size} must be a multiple of {2 * factor} for this VAE")
    latent = image_size // factor
    if kind == "flux":
        model, targets = FluxVelocityModel(transformer, latent, flux_guidance), FLUX_LORA_TARGETS
    else:
        model, targets = SD3VelocityModel(transformer, latent), SD3_LORA_TARGETS
    return DiffusersModel(kind, folder, transformer, model, decode, latent, list(targets))


def encode_or_load_embeddings(pipeline_dir: Path, prompts: Sequence[str], cache_dir: Path,
                              max_sequence_length: int | None = None) -> Path:
    """A `mixgrpo preprocess` folder holding ``prompts``: made once with the pipeline's own text
    encoders under ``cache_dir`` (keyed by pipeline, prompts and length), reused afterwards."""
    from ..text.preprocess import preprocess_prompts

    unique = list(dict.fromkeys(prompts))
    key = json.dumps([str(Path(pipeline_dir).resolve()), unique, max_sequence_length])
    out = Path(cache_dir) / f"embeddings-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (out / "index.json").is_file():
        return out
    os.makedirs(cache_dir, exist_ok=True)
    return preprocess_prompts(pipeline_dir, unique, out, max_sequence_length=max_sequence_length)

"""What the trainer trains: a model with ``velocity(x, t, cond)``, its prompts, how prompts
become conditions and how final samples become images. Every preset runs unchanged on each.

* ``tiny-dit``: the embedded model on the procedural world (prompts from the grammar's
  train / held-out split, MiniLM embeddings, pixel space);
* ``flux`` / ``sd3``: a diffusers transformer from a local pipeline folder, conditions from
  `mixgrpo preprocess` shards (the text encoders are never loaded during RL), images from the
  pipeline's VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference.generate import condition, pixels_from_samples
from .config import TrainConfig

__all__ = ["Backend", "make_backend"]


@dataclass
class Backend:
    model: nn.Module  # velocity(x, t, cond, guidance); .config has channels and image_size
    train_prompts: list[str]
    eval_prompts: list[str]
    condition: Callable[[Sequence[str]], Any]  # prompts -> condition with .index and len
    decode: Callable[[torch.Tensor], torch.Tensor]  # final samples -> images (B, 3, H, W) in [0, 1]
    lora_module: nn.Module  # where a LoRA adapter goes
    lora_targets: list[str] | None  # None = the module's defaults
    embedded_world: bool  # the procedural world: evaluations also report composition and flatness


def _embedded(cfg: TrainConfig, model: nn.Module | None) -> Backend:
    from ..models.checkpoint import load_tiny_dit
    from ..text import cached_embeddings
    from ..world.bench import heldout_eval_prompts
    from ..world.grammar import split_prompts

    model = model if model is not None else load_tiny_dit(cfg.model.checkpoint)
    train, heldout = split_prompts()
    embeddings = cached_embeddings(train + heldout)
    return Backend(model, train, heldout_eval_prompts(min(cfg.eval_prompts, len(heldout))),
                   lambda prompts: condition(embeddings, prompts), pixels_from_samples, model,
                   cfg.model.lora_targets or None, True)


def _vae_decoder(pipeline_dir: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    from diffusers import AutoencoderKL

    folder = pipeline_dir / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no VAE in {pipeline_dir} (vae/config.json missing); pass the pipeline folder")
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval().requires_grad_(False)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode((latents / scale + shift).to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)

    return decode, 2 ** (len(vae.config.block_out_channels) - 1)


def _lookup(prompts_in_file: list[str], tensors: dict[str, torch.Tensor], make: Callable[..., Any], source: str):
    row = {p: i for i, p in enumerate(prompts_in_file)}

    def to_condition(prompts: Sequence[str]):
        missing = [p for p in prompts if p not in row]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} is not in {source}; preprocess it first")
        idx = torch.tensor([row[p] for p in prompts])
        return make(**{k: v[idx] for k, v in tensors.items()})

    return to_condition


def _diffusers(cfg: TrainConfig) -> Backend:
    from ..text.preprocess import load_embeddings

    m = cfg.model
    folder = Path(m.path)
    if m.kind == "flux":
        from ..models.flux import (
            FLUX_LORA_TARGETS,
            FluxCondition,
            FluxVelocityModel,
            load_flux_transformer,
        )

        transformer = load_flux_transformer(folder)
        make_model = lambda size: FluxVelocityModel(transformer, size, m.flux_guidance)  # noqa: E731
        make_cond = lambda prompt_embeds, pooled: FluxCondition(prompt_embeds, pooled)  # noqa: E731
        targets = FLUX_LORA_TARGETS
    else:
        from ..models.sd3 import (
            SD3_LORA_TARGETS,
            SD3Condition,
            SD3VelocityModel,
            load_sd3_transformer,
        )

        transformer = load_sd3_transformer(folder)
        make_model = lambda size: SD3VelocityModel(transformer, size)  # noqa: E731
        make_cond = lambda **kw: SD3Condition(kw["prompt_embeds"], kw["pooled"], kw.get("negative_embeds"),  # noqa: E731
                                              kw.get("negative_pooled"))
        targets = SD3_LORA_TARGETS
    expect = {"expect_dim": transformer.config.joint_attention_dim,
              "expect_pooled": transformer.config.pooled_projection_dim}
    train, train_tensors, _ = load_embeddings(m.embeddings, **expect)
    eval_source = m.eval_embeddings or m.embeddings
    evals, eval_tensors, _ = load_embeddings(eval_source, **expect)
    if cfg.prompts_per_iter > len(train):
        raise ValueError(f"prompts_per_iter {cfg.prompts_per_iter} exceeds the {len(train)} prompts in {m.embeddings}")
    decode, factor = _vae_decoder(folder)
    if m.image_size % (2 * factor):
        raise ValueError(f"model.image_size {m.image_size} must be a multiple of {2 * factor} for this VAE")
    model = make_model(m.image_size // factor)
    train_cond = _lookup(train, train_tensors, make_cond, m.embeddings)
    eval_cond = _lookup(evals, eval_tensors, make_cond, eval_source)

    def conditions(prompts: Sequence[str]):
        try:
            return train_cond(prompts)
        except ValueError:
            return eval_cond(prompts)

    return Backend(model, train, evals[: cfg.eval_prompts], conditions, decode, transformer,
                   m.lora_targets or targets, False)


def make_backend(cfg: TrainConfig, model: nn.Module | None = None) -> Backend:
    """The backend ``cfg.model.kind`` names (``model`` overrides the embedded checkpoint, for tests)."""
    if cfg.model.kind == "tiny-dit":
        return _embedded(cfg, model)
    if model is not None:
        raise ValueError("a model object can only replace the embedded tiny-dit checkpoint")
    return _diffusers(cfg)

"""What the trainer trains: a model with ``velocity(x, t, cond)``, its prompts, how prompts
become conditions and how final samples become images. Every preset runs unchanged on each.

* ``embedded``: the embedded model on the procedural world (prompts from the grammar's
  train / held-out split, MiniLM embeddings, pixel space);
* ``flux`` / ``sd3``: a diffusers transformer from a local pipeline folder, conditions from
  `mixgrpo preprocess` shards (the text encoders are never loaded during RL), images from the
  pipeline's VAE.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inference.generate import condition, pixels_from_samples
from .config import TrainConfig

__all__ = ["Backend", "make_backend", "scheduler_shift", "to_device"]


@dataclass
class Backend:
    model: nn.Module  # velocity(x, t, cond, guidance); .config has channels and image_size
    train_prompts: list[str]
    eval_prompts: list[str]
    condition: Callable[[Sequence[str]], Any]  # prompts -> condition with .index and len
    decode: Callable[[torch.Tensor], torch.Tensor]  # final samples -> images (B, 3, H, W) in [0, 1]
    lora_module: nn.Module  # where a LoRA adapter goes
    lora_targets: list[str] | None  # None = the module's defaults
    # rewards every held-out evaluation reports besides the training ones (the embedded world:
    # composition and flatness, so hacking one shows in the other), and those whose score 1
    # means "fully correct" (their exact rate is reported too)
    eval_rewards: tuple[str, ...] = ()
    exact_rewards: tuple[str, ...] = ()
    scheduler_shift: float | None = None  # the time shift the model's scheduler config implies (flux/sd3)


def to_device(cond: Any, device: torch.device) -> Any:
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
    path = pipeline_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"sampler.shift=scheduler but {path} is missing; give sampler.shift a number")
    c = json.loads(path.read_text())
    if not c.get("use_dynamic_shifting"):
        return float(c.get("shift", 1.0))
    seq = (latent_size // 2) ** 2
    lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    mu = c.get("base_shift", 0.5) + (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) * (seq - lo) / (hi - lo)
    return mu if c.get("time_shift_type") == "linear" else math.exp(mu)


def _embedded(cfg: TrainConfig, model: nn.Module | None) -> Backend:
    from ..models.checkpoint import load_embedded
    from ..text import cached_embeddings
    from ..world.grammar import heldout_eval_prompts, split_prompts

    model = model if model is not None else load_embedded(cfg.model.checkpoint)
    train, heldout = split_prompts()
    embeddings = cached_embeddings(train + heldout)
    return Backend(model, train, heldout_eval_prompts(min(cfg.eval_prompts, len(heldout))),
                   lambda prompts: condition(embeddings, prompts), pixels_from_samples, model,
                   cfg.model.lora_targets or None, ("composition", "flatness"), ("composition",))


def _vae_decoder(pipeline_dir: Path, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    from diffusers import AutoencoderKL

    folder = pipeline_dir / "vae"
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
    # a LoRA run keeps the frozen base in bf16 (the adapter trains in fp32); a full fine-tune
    # keeps fp32 master weights and autocasts
    weight_dtype = torch.bfloat16 if m.dtype == "bfloat16" and m.lora_rank > 0 else torch.float32
    if m.kind == "flux":
        from ..models.flux import (
            FLUX_LORA_TARGETS,
            FluxCondition,
            FluxVelocityModel,
            load_flux_transformer,
        )

        transformer = load_flux_transformer(folder, weight_dtype)
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

        transformer = load_sd3_transformer(folder, weight_dtype)
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
    decode, factor = _vae_decoder(folder, torch.device(m.device))
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

    shift = scheduler_shift(folder, m.image_size // factor) if cfg.sampler.shift == "scheduler" else None
    return Backend(model, train, evals[: cfg.eval_prompts], conditions, decode, transformer,
                   m.lora_targets or targets, scheduler_shift=shift)


def make_backend(cfg: TrainConfig, model: nn.Module | None = None) -> Backend:
    """The backend ``cfg.model.kind`` names (``model`` overrides the embedded checkpoint, for tests)."""
    if cfg.model.kind == "embedded":
        backend = _embedded(cfg, model)
    elif model is not None:
        raise ValueError("a model object can only replace the embedded model checkpoint")
    else:
        backend = _diffusers(cfg)
    device = torch.device(cfg.model.device)
    if device.type != "cpu":
        on_host = backend.condition
        backend.condition = lambda prompts: to_device(on_host(prompts), device)
    return backend

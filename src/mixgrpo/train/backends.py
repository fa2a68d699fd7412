"""What the trainer trains: a model with ``velocity(x, t, cond)``, its prompts, how prompts
become conditions and how final samples become images. Every preset runs unchanged on each.

* ``embedded``: the embedded model on the procedural world its config names (the image
  grammar's or the moving-shapes world's train / held-out split, MiniLM embeddings, pixel space);
* ``flux`` / ``sd3`` / ``qwen-image`` / ``flux2`` / ``wan`` / ``sd``: a diffusers transformer
  (SD1.x/2.x/XL: a UNet) from a local pipeline folder, conditions from `mixgrpo preprocess` shards
  (the text encoders are never loaded during RL), images (Wan: videos) from the pipeline's VAE. An
  ``sd`` model brings its own time grid and start (its DDIM timesteps; see
  :mod:`mixgrpo.models.sd`), which the trainer asks for through
  :func:`~mixgrpo.inference.generate.sampling_grid` and
  :func:`~mixgrpo.inference.generate.start_samples`; ``sampler.shift`` does not apply to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..inference.diffusers_models import load_diffusers_model, scheduler_shift, to_device
from ..inference.generate import condition, pixels_from_samples
from .config import TrainConfig

__all__ = ["Backend", "make_backend", "scheduler_shift", "to_device"]


@dataclass
class Backend:
    model: nn.Module  # velocity(x, t, cond, guidance); .config has channels and image_size (video: and frames)
    train_prompts: list[str]
    eval_prompts: list[str]
    condition: Callable[[Sequence[str]], Any]  # prompts -> condition with .index and len
    decode: Callable[[torch.Tensor], torch.Tensor]  # final samples -> images (B, 3, H, W) / videos (B, F, 3, H, W) in [0, 1]
    lora_module: nn.Module  # where a LoRA adapter goes
    lora_targets: list[str] | None  # None = the module's defaults
    # rewards every held-out evaluation reports besides the training ones (the embedded world:
    # composition and flatness, so hacking one shows in the other), and those whose score 1
    # means "fully correct" (their exact rate is reported too)
    eval_rewards: tuple[str, ...] = ()
    exact_rewards: tuple[str, ...] = ()
    scheduler_shift: float | None = None  # the time shift the model's scheduler config implies (diffusers kinds)

    @property
    def video(self) -> bool:
        """Whether the model's samples are videos (its config has ``frames``)."""
        return getattr(self.model.config, "frames", None) is not None


def _embedded(cfg: TrainConfig, model: nn.Module | None) -> Backend:
    from ..models.checkpoint import load_embedded
    from ..text import cached_embeddings
    from ..world import world_of

    model = model if model is not None else load_embedded(cfg.model.checkpoint)
    world = world_of(model.config)  # the model says what it generates: image world or moving shapes
    train, heldout = world.split()
    embeddings = cached_embeddings(train + heldout)
    return Backend(model, train, world.eval_prompts(cfg.eval_prompts), lambda prompts: condition(embeddings, prompts),
                   pixels_from_samples, model, cfg.model.lora_targets or None, world.eval_rewards, world.exact_rewards)


def _diffusers(cfg: TrainConfig) -> Backend:
    m = cfg.model
    # a LoRA run keeps the frozen base in bf16 (the adapter trains in fp32); a full fine-tune
    # keeps fp32 master weights and autocasts
    weight_dtype = torch.bfloat16 if m.dtype == "bfloat16" and m.lora_rank > 0 else torch.float32
    parts = load_diffusers_model(m.kind, m.path, image_size=m.image_size, device=m.device, dtype=weight_dtype,
                                 flux_guidance=m.flux_guidance, frames=m.frames)
    train_cond = parts.conditions(m.embeddings)
    eval_source = m.eval_embeddings or m.embeddings
    eval_cond = parts.conditions(eval_source) if eval_source != m.embeddings else train_cond
    if cfg.prompts_per_iter > len(train_cond.prompts):
        raise ValueError(f"prompts_per_iter {cfg.prompts_per_iter} exceeds the {len(train_cond.prompts)} prompts in {m.embeddings}")

    def conditions(prompts: Sequence[str]):
        return train_cond(prompts) if not train_cond.missing(prompts) else eval_cond(prompts)

    shift = None
    if cfg.sampler.shift == "scheduler":  # FLUX.2's depends on the step count
        shift = scheduler_shift(parts.folder, parts.latent_size, cfg.sampler.num_steps)
    return Backend(parts.model, train_cond.prompts, eval_cond.prompts[: cfg.eval_prompts], conditions, parts.decode,
                   parts.transformer, m.lora_targets or parts.lora_targets, scheduler_shift=shift)


def _choose_prompts(backend: Backend, cfg: TrainConfig) -> None:
    """Apply ``prompt_pool`` (a fixed seeded sample of the training prompts, in their order) and
    ``eval_split=train`` (evaluate on the training prompts: a fixed seeded order of them, cycled
    to ``eval_prompts``; a repeat draws its own noise). Seeded apart from ``cfg.seed``, so every
    seed and method of a bench trains and evaluates on the same prompts."""
    train = backend.train_prompts
    if cfg.prompt_pool:
        if cfg.prompt_pool > len(train):
            raise ValueError(f"prompt_pool {cfg.prompt_pool} exceeds the {len(train)} training prompts; lower it, "
                             "or 0 to train on all of them")
        keep = np.sort(np.random.default_rng(0).permutation(len(train))[: cfg.prompt_pool])
        backend.train_prompts = train = [train[i] for i in keep]
    if cfg.eval_split == "train":
        order = np.random.default_rng(1).permutation(len(train))
        backend.eval_prompts = [train[order[i % len(train)]] for i in range(cfg.eval_prompts)]


def make_backend(cfg: TrainConfig, model: nn.Module | None = None) -> Backend:
    """The backend ``cfg.model.kind`` names (``model`` overrides the embedded checkpoint, for tests)."""
    if cfg.model.kind == "embedded":
        backend = _embedded(cfg, model)
    elif model is not None:
        raise ValueError("a model object can only replace the embedded model checkpoint")
    else:
        backend = _diffusers(cfg)
    _choose_prompts(backend, cfg)
    device = torch.device(cfg.model.device)
    if device.type != "cpu":
        on_host = backend.condition
        backend.condition = lambda prompts: to_device(on_host(prompts), device)
    return backend

"""Deterministic ODE sampling for inference and evaluation, with MixGRPO's base-model blend.

Blend (MixGRPO inference, "80/20"): with ``T`` steps and blend fraction ``F``, the first
``T - floor(F T + 1/2)`` steps use the fine-tuned velocity ``v_theta`` and the final ``floor(F T + 1/2)``
steps (the clean end, where fine detail forms and reward hacking shows) use the base model's
``v_ref``::

    v(x, t_i) = v_theta(x, t_i)  if i <  T - floor(F T + 1/2)
              = v_ref(x, t_i)    otherwise

``F = 0`` is plain sampling with the policy, ``F = 1`` plain sampling with the base model,
bitwise. Every solver here evaluates the model only at grid times ``t_i``, so the switch is
made on ``t`` and works with Euler and the multistep DPM-Solver++ alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..core.grids import uniform_grid
from ..core.sampler import Velocity, mixed_plan, sample
from ..models.tiny_dit import TextCondition
from ..text import PromptEmbeddings

__all__ = ["EVAL_CHUNK", "VelocityModel", "blended_velocity", "condition", "generate", "generate_prompts",
           "has_time_grid", "noise_shape", "pixels_from_samples", "sampling_grid", "start_samples"]

EVAL_CHUNK = 64  # prompts per batch; chunk c draws its noise from seed + c * EVAL_CHUNK


class VelocityModel(Protocol):
    """What inference needs of a model: an image config and a guided velocity.

    A model whose path is not the flow's from ``t = 1`` (a VP diffusion model, see
    :mod:`mixgrpo.models.sd`) may also have ``time_grid(steps) -> grid`` (its own grid of
    times, used instead of ``uniform_grid(steps, shift)``) and ``initial_noise_scale(grid) ->
    float`` (its start is ``scale * randn``); the samplers ask through :func:`sampling_grid` and
    :func:`start_samples`, and flow models are untouched (bitwise)."""

    config: object

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, guidance: float = 1.0) -> torch.Tensor: ...


def noise_shape(config: object) -> tuple[int, ...]:
    """One sample's latent shape: ``(C, H, W)``, or ``(C, F, H, W)`` for a video model (a config
    with ``frames``, the latent frames)."""
    c, side, frames = config.channels, config.image_size, getattr(config, "frames", None)
    return (c, side, side) if frames is None else (c, frames, side, side)


def has_time_grid(model: object) -> bool:
    """Whether ``model`` brings its own time grid (``time_grid``)."""
    return getattr(model, "time_grid", None) is not None


def sampling_grid(model: object, steps: int, shift: float) -> torch.Tensor:
    """``model.time_grid(steps)`` when the model has one, else ``uniform_grid(steps, shift)``."""
    return model.time_grid(steps) if has_time_grid(model) else uniform_grid(steps, shift=shift)


def start_samples(model: object, noise: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The sampler's start from standard normal ``noise`` at ``grid[0]``: the noise itself (a
    flow model at t = 1), or ``model.initial_noise_scale(grid) * noise``."""
    scale = getattr(model, "initial_noise_scale", None)
    return noise if scale is None else noise * scale(grid)


def condition(embeddings: PromptEmbeddings, prompts: Sequence[str]) -> TextCondition:
    return TextCondition(*embeddings.lookup(list(prompts)))


def switch_step(num_steps: int, blend: float) -> int:
    """Index of the first step run with the base model (``num_steps`` = never)."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1] (0.2 = MixGRPO's 80/20), got {blend}")
    return num_steps - math.floor(blend * num_steps + 0.5)  # half rounds up: 0.5 of 25 -> 13 base steps


def blended_velocity(policy: Velocity, base: Velocity, grid: torch.Tensor, blend: float) -> Velocity:
    """``policy`` on the first ``T - floor(F T + 1/2)`` grid times, ``base`` on the rest."""
    first_base = switch_step(len(grid) - 1, blend)
    if first_base == 0:
        return base
    if first_base == len(grid) - 1:
        return policy
    # midway between the last policy time and the first base time: robust to float rounding
    threshold = 0.5 * float(grid[first_base - 1] + grid[first_base])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return base(x, t) if float(t.reshape(-1)[0]) < threshold else policy(x, t)

    return velocity


@torch.no_grad()
def generate(
    model: VelocityModel,
    cond: TextCondition,
    *,
    steps: int = 25,
    shift: float = 3.0,
    solver: str = "euler",
    guidance: float = 1.0,
    seed: int = 0,
    blend: float = 0.0,
    base: VelocityModel | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Deterministic ODE sampling from ``randn(seed)`` (drawn on the CPU, then moved to
    ``device``) on ``uniform_grid(steps, shift)`` or the model's own grid (:func:`sampling_grid`);
    returns images ``(B, 3, H, W)`` (a video model's: ``(B, F, 3, H, W)``) in ``[0, 1]`` on the
    CPU.

    ``blend`` > 0 runs the final fraction of the steps with ``base`` (see the module doc).
    ``decode`` maps final samples to images (a VAE for latent models); the default is the
    embedded model's ``(x + 1) / 2``."""
    cfg = model.config
    if switch_step(steps, blend) < steps and base is None:
        raise ValueError("blend > 0 needs the base model to blend with")
    grid = sampling_grid(model, steps, shift)
    noise = torch.randn(len(cond), *noise_shape(cfg), generator=torch.Generator().manual_seed(seed))
    x1 = start_samples(model, noise, grid).to(device)
    velocity: Velocity = lambda x, t: model.velocity(x, t, cond, guidance)  # noqa: E731
    if base is not None:
        velocity = blended_velocity(velocity, lambda x, t: base.velocity(x, t, cond, guidance), grid, blend)
    out = sample(velocity, x1, mixed_plan(grid, [], solver))
    return (decode or pixels_from_samples)(out.x0).cpu()


def pixels_from_samples(x0: torch.Tensor) -> torch.Tensor:
    """The embedded model works in pixel space scaled to [-1, 1]; a video model's clips
    ``(B, C, F, H, W)`` come back frames-first, ``(B, F, C, H, W)``, as video rewards take them."""
    pixels = ((x0 + 1) / 2).clamp(0, 1)
    return pixels.transpose(1, 2) if pixels.ndim == 5 else pixels


def generate_prompts(
    model: VelocityModel,
    conditions: PromptEmbeddings | Callable[[Sequence[str]], object],
    prompts: Sequence[str],
    *,
    seed: int = 0,
    on_chunk: Callable[[int], None] | None = None,
    **kwargs,
) -> torch.Tensor:
    """:func:`generate` over many prompts in chunks of :data:`EVAL_CHUNK`; chunk ``c`` uses
    seed ``seed + c * EVAL_CHUNK``, so results do not depend on the caller. ``conditions``
    is the embedded model's :class:`PromptEmbeddings` or any ``prompts -> condition``."""
    to_condition = conditions if callable(conditions) else (lambda chunk: condition(conditions, chunk))
    images = []
    for start in range(0, len(prompts), EVAL_CHUNK):
        chunk = prompts[start : start + EVAL_CHUNK]
        images.append(generate(model, to_condition(chunk), seed=seed + start, **kwargs).float())
        if on_chunk is not None:
            on_chunk(len(chunk))
    return torch.cat(images)

"""What inference holds of a checkpoint: :class:`Policy` (loaders: :mod:`.policy` for the
embedded model, :mod:`.diffusers_policy` for the diffusers models)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.checkpoint import EmbeddedModel
from ..models.lora import adapters_disabled
from ..models.tiny_dit import TextCondition
from ..text import PromptEmbeddings, cached_embeddings

__all__ = ["DISTILLED_KINDS", "AdapterOff", "Policy"]

DISTILLED_KINDS = ("flux", "flux2")  # guidance-distilled: guidance goes into an embedding, no CFG


@dataclass
class Policy:
    """A model ready for inference, with the base model to blend with, how its final samples
    become images, its grid's time shift and how prompts become its conditions."""

    name: str
    model: EmbeddedModel | Any  # anything with velocity(x, t, cond, guidance) and .config
    base: EmbeddedModel | Any
    source: str  # where the weights came from, for reports
    kind: str = "embedded"  # embedded | flux | sd3 | qwen-image | flux2 | wan | sd
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the embedded model's pixel space
    shift: float = 3.0  # time shift of the sampling grid (diffusers kinds: their scheduler's)
    device: str = "cpu"  # where the model samples (noise is drawn on the CPU, then moved)
    # prompts -> (prompts -> condition); None: the embedded model's MiniLM embeddings (cached)
    prompt_conditions: Callable[[Sequence[str]], Callable[[Sequence[str]], Any]] | None = None
    # steps -> shift where the scheduler's shift depends on the step count (FLUX.2); None: ``shift``
    shift_at: Callable[[int], float] | None = None
    # a VP model's own grid and start (models/sd.py; generate.sampling_grid / start_samples); None: the flow's
    time_grid: Callable[[int], torch.Tensor] | None = None
    initial_noise_scale: Callable[[torch.Tensor], float] | None = None

    def __post_init__(self) -> None:
        # a model that brings its own grid and start (the embedded epsilon / v model) samples on
        # them: the flow's grid would start it at alphabar = 0, where its velocity is not finite
        if self.time_grid is None:
            self.time_grid = getattr(self.model, "time_grid", None)
        if self.initial_noise_scale is None:
            self.initial_noise_scale = getattr(self.model, "initial_noise_scale", None)

    @property
    def config(self):
        return self.model.config

    @property
    def video(self) -> bool:
        """Whether it samples videos ``(B, F, 3, H, W)`` (latents with frames) rather than images."""
        return hasattr(self.config, "frames")

    def grid_shift(self, steps: int) -> float:
        """The time shift of a ``steps``-step sampling grid."""
        return self.shift if self.shift_at is None else self.shift_at(steps)

    def check_guidance(self, guidance: float) -> None:
        """Refuse classifier-free guidance for a guidance-distilled model before any prompt is
        encoded (its text encoders can take minutes to load)."""
        if guidance != 1.0 and self.kind in DISTILLED_KINDS:
            raise ValueError(f"{self.name} is guidance-distilled ({self.kind}): set --flux-guidance, not --cfg "
                             f"(--cfg must be 1, got {guidance:g})")

    def check_shift(self, shift: float | None) -> None:
        """Refuse a time shift for a model that samples on its own grid (SD's DDIM timesteps)."""
        if shift is not None and self.time_grid is not None:
            raise ValueError(f"{self.name} samples on its scheduler's DDIM timesteps ({self.kind}), which no time shift "
                             "changes: leave out --shift")

    def conditions(self, prompts: Sequence[str]) -> PromptEmbeddings | Callable[[Sequence[str]], Any]:
        """What :func:`~mixgrpo.inference.generate.generate_prompts` needs to condition on ``prompts``."""
        if self.prompt_conditions is None:
            return cached_embeddings(list(dict.fromkeys(prompts)))
        return self.prompt_conditions(prompts)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, guidance: float = 1.0) -> torch.Tensor:
        return self.model.velocity(x, t, cond, guidance)


class AdapterOff(torch.nn.Module):
    """The base model of a LoRA policy: the same network with its adapter switched off (no
    second copy of the weights)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float = 1.0) -> torch.Tensor:
        with adapters_disabled(self.model):
            return self.model.velocity(x, t, cond, guidance)

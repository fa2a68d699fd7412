"""``centring``: a layout preference, how close the image's foreground sits to the centre.

    c = the foreground-weighted centroid of the image (foreground weight: RGB distance of a
        pixel from the background colour, capped at 1)
    r = 1 - |c - centre| / (side / 2)            (in [0, 1]; an empty image scores 0)

It knows nothing of the prompt. Relation prompts need their two objects apart and count
prompts spread their objects, but a centred *arrangement* costs them nothing, so it is a
mild third objective beside ``composition`` and ``flatness`` for the multi-reward studies
(``weighting.name``), not a measure of correctness.
"""

from __future__ import annotations

import torch

from ..world.grammar import BACKGROUND
from .base import check_images, register_reward

__all__ = ["CentringReward"]


@register_reward("centring")
class CentringReward:
    """Prompt-blind closeness of the foreground's centroid to the image centre, in [0, 1]."""

    name = "centring"

    def __init__(self) -> None:
        self._background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255.0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score ``(B, 3, H, W)`` images in [0, 1]; ``prompts`` are only length-checked."""
        check_images(images, prompts)
        x = images.detach().to("cpu", torch.float32)
        weight = (x - self._background).norm(dim=1).clamp(max=1.0)  # (B, H, W)
        h, w = weight.shape[1:]
        mass = weight.sum(dim=(1, 2))
        rows = torch.arange(h, dtype=torch.float32) + 0.5
        cols = torch.arange(w, dtype=torch.float32) + 0.5
        cy = (weight.sum(dim=2) * rows).sum(dim=1) / mass.clamp(min=1e-8)
        cx = (weight.sum(dim=1) * cols).sum(dim=1) / mass.clamp(min=1e-8)
        dist = torch.sqrt((cy - h / 2) ** 2 + (cx - w / 2) ** 2)
        score = (1 - dist / (min(h, w) / 2)).clamp(min=0.0)
        return torch.where(mass > 1e-6, score, torch.zeros_like(score))

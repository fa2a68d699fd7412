"""``motion-composition``: the verifier of the moving-shapes world (:mod:`mixgrpo.world.motion`),
a video reward on ``(B, F, 3, H, W)`` clips.

Each frame goes through the image verifier's object detection (``composition`` v2: palette
colours, template shapes at the world's size, unexplained foreground). For "a <colour>
<shape> moving <direction>":

    credit = 0.2 [share of frames with an object of the colour]
           + 0.2 [share of frames with the object]
           + 0.6 [share of frame-to-frame steps whose two frames each hold exactly that one
                  object and whose centroid moves at least ``min_step`` px (at 32 px) the
                  right way, with no more sideways drift than forward travel]
    score  = credit x mean over frames of the cleanliness factor (as ``composition``)

So colour mass earns nothing, a still, reversed or vanishing shape keeps at most the 0.4 of
being there, and clutter in any frame costs. Only a clip whose every step moves right scores
1. The motion term counts steps, not whole clips, so a clip that moves right for some steps
earns part of it: with an all-or-nothing term the embedded video base (2% of its clips exact)
gave GRPO groups of nearly equal rewards and MixGRPO no signal (README, "Video rewards").
"""

from __future__ import annotations

from itertools import pairwise

import torch

from ..world.grammar import PromptError
from ..world.motion import DIRECTIONS, MotionSpec, parse_motion_prompt
from .base import check_videos, register_reward
from .composition import CompositionReward, Verdict, cleanliness

__all__ = ["MotionCompositionReward", "motion_credit"]


def motion_credit(spec: MotionSpec, frames: list[Verdict], min_step: float) -> float:
    """The prompt credit of one clip's per-frame verdicts (see the module doc), before cleanliness."""
    target = (spec.colour, spec.shape)
    colour = sum(any(o.colour == spec.colour for o in v.objects) for v in frames) / len(frames)
    present = sum(any((o.colour, o.shape) == target for o in v.objects) for v in frames) / len(frames)
    if len(frames) < 2:
        return 0.2 * colour + 0.2 * present
    dx, dy = DIRECTIONS[spec.direction]

    def alone(v: Verdict) -> bool:
        return len(v.objects) == 1 and (v.objects[0].colour, v.objects[0].shape) == target

    right = 0
    for before, after in pairwise(frames):
        if alone(before) and alone(after):
            ox, oy = after.objects[0].cx - before.objects[0].cx, after.objects[0].cy - before.objects[0].cy
            along, across = ox * dx + oy * dy, ox * dy + oy * dx
            right += along >= min_step and abs(across) <= along
    return 0.2 * colour + 0.2 * present + 0.6 * right / (len(frames) - 1)


@register_reward("motion-composition")
class MotionCompositionReward:
    """Verifier of the moving-shapes world, in [0, 1] (see the module doc).

    Args:
        permissive: score prompts outside the grammar 0 instead of raising.
        min_step: least travel per frame in pixels at 32 px (the world renders 2).
        **options: the per-frame detector's options (``composition``'s: ``max_colour_distance``,
            ``min_iou``, ``area_tolerance``, ``free_pixels``, ``junk_budget``).
    """

    name = "motion-composition"
    video = True

    def __init__(self, permissive: bool = False, min_step: float = 1.0, **options):
        if not min_step > 0:
            raise ValueError(f"min_step must be > 0 pixels, got {min_step}")
        self.frames = CompositionReward(**options)
        self.permissive, self.min_step = permissive, min_step

    def _spec(self, prompt: str) -> MotionSpec | None:
        try:
            return parse_motion_prompt(prompt)
        except PromptError:
            if self.permissive:
                return None
            raise

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_videos(videos, prompts)
        specs = [self._spec(p) for p in prompts]  # bad prompts fail before any work
        f, h, w = videos.shape[1], videos.shape[3], videos.shape[4]
        verdicts = self.frames.verdicts(videos.flatten(0, 1))
        unit = h * w / 32**2
        free, budget = self.frames.free_pixels * unit, self.frames.junk_budget * unit
        scores = []
        for i, spec in enumerate(specs):
            clip = verdicts[i * f : (i + 1) * f]
            if spec is None:
                scores.append(0.0)
                continue
            clean = sum(cleanliness(v, free, budget) for v in clip) / f
            scores.append(motion_credit(spec, clip, self.min_step * unit**0.5) * clean)
        return torch.tensor(scores, dtype=torch.float32)

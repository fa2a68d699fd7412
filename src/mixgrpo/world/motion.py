"""The embedded world's moving-shapes variant: short clips of one shape moving one way.

Prompt form::

    a <colour> <shape> moving <direction>        "a red circle moving left"

with ``direction`` one of left, right, up, down (image y grows down, so "up" decreases y).
A clip is ``frames`` frames of one renderer template sliding ``speed`` pixels per frame (at
32 px, scaled with the image) on the plain background, placed so that every frame holds
the whole shape. The held-out split follows the image world: a prompt is held out when its
(colour, shape) pair is in :data:`~mixgrpo.world.grammar.HELD_OUT_PAIRS`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

from .grammar import BACKGROUND, COLOURS, HELD_OUT_PAIRS, SHAPES, PromptError
from .render import MIN_SIZE, shape_template

__all__ = ["DIRECTIONS", "MotionSpec", "format_motion_prompt", "motion_prompts", "parse_motion_prompt",
           "render_clip", "sample_clips", "split_motion_prompts"]

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)
_RE = re.compile(rf"^an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)})$")


@dataclass(frozen=True)
class MotionSpec:
    """One ``colour`` ``shape`` moving towards ``direction``."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.shape not in SHAPES or self.direction not in DIRECTIONS:
            raise PromptError(f"unknown colour, shape or direction in {self!r}; colours: {', '.join(COLOURS)}; "
                              f"shapes: {', '.join(SHAPES)}; directions: {', '.join(DIRECTIONS)}")


def format_motion_prompt(spec: MotionSpec) -> str:
    return f"a {spec.colour} {spec.shape} moving {spec.direction}"


def parse_motion_prompt(text: str) -> MotionSpec:
    """Parse "a <colour> <shape> moving <direction>" (case and extra spaces ignored)."""
    match = _RE.match(" ".join(str(text).lower().split()))
    if not match:
        raise PromptError(f"prompt {text!r} is outside the moving-shapes grammar: expected "
                          f"'a <colour> <shape> moving <{'|'.join(DIRECTIONS)}>'")
    return MotionSpec(*match.groups())


def motion_prompts() -> list[str]:
    """Every moving-shapes prompt, in a fixed order (6 colours x 3 shapes x 4 directions = 72)."""
    return [format_motion_prompt(MotionSpec(c, s, d)) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def split_motion_prompts() -> tuple[list[str], list[str]]:
    """``(train, heldout)``: held out when the (colour, shape) pair is a held-out pair (12 prompts)."""
    train, heldout = [], []
    for p in motion_prompts():
        spec = parse_motion_prompt(p)
        (heldout if (spec.colour, spec.shape) in HELD_OUT_PAIRS else train).append(p)
    return train, heldout


def render_clip(spec: MotionSpec, rng: np.random.Generator, frames: int = 5, size: int = 32,
                speed: float = 2.0) -> np.ndarray:
    """``(frames, size, size, 3)`` uint8: the shape at a random start, moving ``speed`` px per
    frame (at 32 px) towards ``spec.direction``, whole in every frame."""
    if size < MIN_SIZE or frames < 1 or not speed > 0:
        raise ValueError(f"need size >= {MIN_SIZE}, frames >= 1 and speed > 0; got {size}, {frames}, {speed}")
    mask = shape_template(spec.shape, size)
    h, w = mask.shape
    step = max(1, round(speed * size / 32))
    travel = step * (frames - 1)
    dx, dy = DIRECTIONS[spec.direction]
    # the start leaves room for the whole travel (1 px border, as the image world)
    x_lo, x_hi = 1 + (travel if dx < 0 else 0), size - w - (travel if dx > 0 else 0)
    y_lo, y_hi = 1 + (travel if dy < 0 else 0), size - h - (travel if dy > 0 else 0)
    if x_hi <= x_lo or y_hi <= y_lo:
        raise ValueError(f"a {spec.shape} moving {travel} px does not fit a {size} px frame; use fewer frames or "
                         "a lower speed")
    x0, y0 = int(rng.integers(x_lo, x_hi)), int(rng.integers(y_lo, y_hi))
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    clip[:] = BACKGROUND
    for k in range(frames):
        y, x = y0 + k * step * dy, x0 + k * step * dx
        clip[k, y : y + h, x : x + w][mask] = COLOURS[spec.colour]
    return clip


def sample_clips(n: int, seed: int, prompts: list[str] | None = None, frames: int = 5,
                 size: int = 32) -> tuple[list[str], torch.Tensor]:
    """``n`` prompts drawn uniformly and their clips, ``(n, frames, 3, size, size)`` in [0, 1]."""
    pool = list(prompts) if prompts is not None else motion_prompts()
    if n < 1 or not pool:
        raise ValueError("need n >= 1 and at least one prompt")
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(pool), size=n)
    clips = np.stack([render_clip(parse_motion_prompt(pool[i]), rng, frames, size) for i in picks])
    return [pool[i] for i in picks], torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255.0

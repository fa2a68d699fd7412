"""The moving-shapes world and its verifier: clean clips score 1, and every way an optimiser
could fake motion (still, reversed, flickering, vanishing, jumping, smeared, doubled,
recoloured) is held to a stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgrpo.rewards import get_reward
from mixgrpo.world import (
    HELD_OUT_PAIRS,
    PromptError,
    motion_prompts,
    parse_motion_prompt,
    render_clip,
    sample_clips,
    split_motion_prompts,
)

REWARD = get_reward("motion-composition")


def _clips(prompts, seed=0, frames=5):
    rng = np.random.default_rng(seed)
    arr = np.stack([render_clip(parse_motion_prompt(p), rng, frames) for p in prompts])
    return torch.from_numpy(arr).permute(0, 1, 4, 2, 3).float() / 255


def test_grammar_split_and_renders():
    prompts = motion_prompts()
    train, held = split_motion_prompts()
    assert len(prompts) == 72 and len(held) == 12 and sorted(train + held) == sorted(prompts)
    assert all((parse_motion_prompt(p).colour, parse_motion_prompt(p).shape) in HELD_OUT_PAIRS for p in held)
    assert parse_motion_prompt("A  Red circle moving LEFT").direction == "left"
    with pytest.raises(PromptError, match="moving-shapes grammar"):
        parse_motion_prompt("a red circle moving sideways")
    clip = render_clip(parse_motion_prompt("a blue square moving right"), np.random.default_rng(0))
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
    xs = [np.nonzero((f != f[0, 0]).any(-1))[1].mean() for f in clip]
    assert np.allclose(np.diff(xs), 2.0)  # 2 px per frame to the right
    with pytest.raises(ValueError, match="does not fit"):
        render_clip(parse_motion_prompt("a red square moving up"), np.random.default_rng(0), frames=20)


def test_clean_clips_score_one():
    prompts, clips = sample_clips(96, seed=1)
    scores = REWARD(clips, prompts)
    assert scores.min().item() >= 0.98  # measured 1.0 for all 96


def _family_scores():
    prompts = motion_prompts()
    clean = _clips(prompts, seed=2)
    out = {"clean": clean, "reversed": clean.flip(1), "still": clean[:, :1].expand_as(clean).clone()}
    flicker = clean.clone()
    flicker[:, 1::2] = clean[:, :1, :, :1, :1]  # every other frame empty background
    out["flickering"] = flicker
    vanish = clean.clone()
    vanish[:, 3:] = clean[:, :1, :, :1, :1]
    out["vanishing"] = vanish
    jump = clean.clone()
    jump[:, 1:4] = clean[:, :1]  # holds still three frames, then leaps to the end position
    out["jumping"] = jump
    blur = clean.clone()
    blur[:, 1:] = torch.maximum(clean[:, 1:], clean[:, :-1])  # each frame keeps its previous one: a 2 px trail
    out["blurred"] = blur
    out["streaked"] = torch.cummax(clean, dim=1).values  # each frame keeps all earlier ones: a streak
    double = torch.maximum(clean, clean.flip(-1))  # a mirrored twin moves beside it
    out["doubled"] = double
    recolour = clean[:, :, [2, 0, 1]]  # same motion, channels rotated: wrong colour
    out["recoloured"] = recolour
    return prompts, {k: REWARD(v, prompts) for k, v in out.items()}


# family -> bound on the mean score, and why
BOUNDS = {
    "reversed": 0.40,  # there, but moving the wrong way: the 0.4 of presence only
    "still": 0.40,  # no motion
    "flickering": 0.25,  # present in 3 of 5 frames: at most 0.4 x 3/5
    # the motion term counts steps: partial motion earns part of its 0.6, never the whole
    "vanishing": 0.55,  # 3 of 5 frames there (0.24), 2 of 4 steps right (0.3), then gone
    "jumping": 0.55,  # there throughout (0.4); three still steps fail, the one leap counts (0.15)
    # a 2 px trail (motion blur) is within the image verifier's size and IoU tolerance for
    # squares, mostly not for circles and triangles (measured 0.49): it is not penalised as junk
    "blurred": 0.60,
    "streaked": 0.20,  # all earlier frames kept: a streak is no shape, unexplained mass
    "doubled": 0.40,  # two objects in a frame (where the twin does not overlap)
    "recoloured": 0.20,  # wrong colour: no credit for the object
}


def test_each_way_of_faking_motion_stays_under_its_bound():
    _, scores = _family_scores()
    assert scores["clean"].mean().item() >= 0.98
    table = {k: round(v.mean().item(), 3) for k, v in scores.items()}
    print("motion verifier, mean over 72 prompts:", table)
    for family, bound in BOUNDS.items():
        assert table[family] <= bound, (family, table[family], bound)


def test_bad_inputs():
    _, clips = sample_clips(2, seed=0)
    with pytest.raises(PromptError):
        REWARD(clips, ["a red circle", "a red circle moving left"])
    assert get_reward("motion-composition", permissive=True)(clips, ["nope", "nope"]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="min_step must be > 0"):
        get_reward("motion-composition", min_step=0)
    with pytest.raises(ValueError, match="scores videos"):
        from mixgrpo.rewards import score

        score(REWARD, clips[:, 0], ["a red circle moving left"] * 2)

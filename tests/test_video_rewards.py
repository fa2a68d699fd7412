"""Video rewards: the per-frame wrapper, temporal consistency (tried the way an optimiser
would game it), and the registry's image/video checks."""

from __future__ import annotations

import pytest
import torch

from mixgrpo.rewards import get_reward, score
from mixgrpo.world.grammar import parse_prompt
from mixgrpo.world.render import render

PROMPT = "a red circle left of a blue square"


def _clip(frames: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(frames).unsqueeze(0)  # (1, F, 3, H, W)


def _moving_square(frames: int, step: int, size: int = 32) -> torch.Tensor:
    """A 8 px yellow square sliding right by ``step`` px per frame on the dark background."""
    out = []
    for k in range(frames):
        img = torch.full((3, size, size), 20 / 255)
        x = 4 + k * step
        img[:, 12:20, x : x + 8] = torch.tensor([235, 215, 40]).view(3, 1, 1) / 255
        out.append(img)
    return _clip(out)


def _render(prompt: str, seed: int) -> torch.Tensor:
    import numpy as np

    image = render(parse_prompt(prompt), np.random.default_rng(seed), size=32)
    return torch.as_tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255


def test_per_frame_scores_each_frame_and_aggregates():
    good, other = _render(PROMPT, 0), _render("two green triangles", 1)
    videos = torch.cat([_clip([good] * 4), _clip([good, good, other, good])])
    prompts = [PROMPT, PROMPT]
    mean = get_reward("per-frame", reward="composition")(videos, prompts)
    worst = get_reward("per-frame", reward="composition", aggregate="min")(videos, prompts)
    frame = score(get_reward("composition"), other.unsqueeze(0), [PROMPT]).item()
    assert mean[0].item() == pytest.approx(1.0, abs=0.02) and worst[0].item() == pytest.approx(mean[0].item())
    assert mean[1].item() == pytest.approx(0.75 * mean[0].item() + 0.25 * frame, abs=1e-6)
    assert worst[1].item() == pytest.approx(frame, abs=1e-6) and frame < 0.5
    # options reach the image reward
    tight = get_reward("per-frame", reward="flatness", tolerance=0.01)
    assert tight.inner.tolerance == 0.01


@pytest.mark.parametrize("radius", [2, 3])
def test_temporal_consistency_forgives_motion_but_not_flicker_noise_or_jumps(radius):
    reward = get_reward("temporal-consistency", radius=radius)
    still = _moving_square(6, 0)
    sliding = _moving_square(6, 2)  # 2 px per frame: within the radius
    gen = torch.Generator().manual_seed(0)
    noisy = (still + 0.1 * torch.randn(still.shape, generator=gen)).clamp(0, 1)
    flicker = still.clone()
    flicker[:, 1::2] = (flicker[:, 1::2] + 0.08).clamp(0, 1)  # every other frame brighter
    jumping = _moving_square(6, 0)
    jumping[:, 3:] = torch.roll(jumping[:, 3:], shifts=12, dims=-1)  # the square teleports 12 px once
    vanishing = still.clone()
    vanishing[:, 3:] = 20 / 255  # the square disappears
    prompts = ["a yellow square"] * 1
    s = {name: reward(v, prompts).item() for name, v in [("still", still), ("sliding", sliding), ("noisy", noisy),
                                                         ("flicker", flicker), ("jumping", jumping),
                                                         ("vanishing", vanishing)]}
    assert s["still"] == 1.0 and s["sliding"] == 1.0
    assert s["noisy"] <= 0.05 and s["flicker"] <= 0.05  # colour noise and flicker: near 0
    # one jump or one vanishing object in 5 frame pairs costs that pair most of its score
    # (measured 0.82-0.85 and 0.91-0.93 for the clip: the mean over pairs)
    assert s["jumping"] < 0.9 and s["vanishing"] < 0.95
    # a 1 px white line appearing at frame 3: only the backward match (g -> f) sees it, since
    # every block of the frame before finds background within the radius (measured 0.950)
    appearing = still.clone()
    appearing[:, 3:, :, 2:30, 26] = 1.0
    assert reward(appearing, prompts).item() < 0.97
    fast = _moving_square(4, 2 * radius + 2)  # faster than the radius forgives
    assert reward(fast, prompts).item() < 0.6  # measured 0.43 (radius 2) and 0.58 (radius 3)


def test_one_frame_is_consistent_and_bad_options_fail():
    assert get_reward("temporal-consistency")(_moving_square(1, 0), ["x"]).item() == 1.0
    with pytest.raises(ValueError, match="radius >= 0, scale > 0 and block >= 1"):
        get_reward("temporal-consistency", scale=0)
    with pytest.raises(ValueError, match="aggregate must be one of mean, min, median"):
        get_reward("per-frame", reward="flatness", aggregate="max")
    with pytest.raises(ValueError, match="already scores videos"):
        get_reward("per-frame", reward="temporal-consistency")


def test_image_rewards_refuse_videos_and_video_rewards_refuse_images():
    video = _moving_square(3, 1)
    with pytest.raises(ValueError, match=r"scores images .*per-frame: \{weight: 1, reward: flatness\}"):
        score(get_reward("flatness"), video, ["x"])
    with pytest.raises(ValueError, match=r"scores videos \(B, F, 3, H, W\) but got images"):
        score(get_reward("temporal-consistency"), video[0], ["x"] * 3)
    with pytest.raises(ValueError, match="got 1 videos but 2 prompts"):
        score(get_reward("temporal-consistency"), video, ["x", "y"])
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        score(get_reward("per-frame", reward="flatness"), video * 255, ["x"])
    assert score(get_reward("per-frame", reward="flatness"), video, ["x"]).shape == (1,)

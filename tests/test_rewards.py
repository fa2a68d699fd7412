"""Embedded rewards: verifier quality on ground truth, partial credit, bad input, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgrpo.rewards import get_reward, list_rewards, register_reward, score, validate_reward_output
from mixgrpo.world import (
    COLOURS,
    PromptError,
    format_prompt,
    parse_prompt,
    perturb_one_attribute,
    sample_pairs,
)


@pytest.fixture(scope="module")
def ground_truth():
    return sample_pairs(1000, seed=0)


def test_verifier_quality_on_1000_ground_truth_renders(ground_truth):
    prompts, images = ground_truth
    reward = get_reward("composition")
    gt = reward(images, prompts).mean().item()
    rng = np.random.default_rng(1)
    wrong = [format_prompt(perturb_one_attribute(parse_prompt(p), rng)) for p in prompts]
    perturbed = reward(images, wrong).mean().item()
    print(f"composition on 1000 ground-truth renders: {gt:.4f}; one-attribute-perturbed prompts: {perturbed:.4f}")
    assert gt >= 0.98, f"ground truth mean {gt:.4f}"
    assert perturbed <= 0.4, f"one-attribute-perturbed mean {perturbed:.4f}"


@pytest.mark.parametrize("size", [24, 48, 64])
def test_verifier_is_exact_on_ground_truth_at_other_sizes(size):
    prompts, images = sample_pairs(200, seed=size, size=size)
    got = get_reward("composition")(images, prompts)
    assert got.min().item() == 1.0, [p for p, g in zip(prompts, got.tolist(), strict=True) if g < 1][:5]


def test_partial_credit_ladder_for_count_prompts():
    _, images = sample_pairs(1, seed=11, prompts=["three purple squares"])
    reward = get_reward("composition")
    got = reward(images.repeat(4, 1, 1, 1), [
        "three purple squares",  # everything right
        "two purple squares",  # colour + shape present, count wrong
        "three purple circles",  # colour present only
        "three red squares",  # nothing of that colour
    ])
    torch.testing.assert_close(got, torch.tensor([1.0, 0.4, 0.2, 0.0]))


def test_relation_credit():
    _, images = sample_pairs(1, seed=12, prompts=["a red circle left of a blue square"])
    got = get_reward("composition")(images.repeat(3, 1, 1, 1), [
        "a red circle left of a blue square",
        "a red circle right of a blue square",  # both objects, wrong relation
        "a red circle left of a green square",  # B missing (and the blue square is an extra object)
    ])
    torch.testing.assert_close(got, torch.tensor([1.0, 0.4, 0.2]))


def test_noise_and_blank_images_score_low_on_composition_high_blank_flatness():
    comp, flat = get_reward("composition"), get_reward("flatness")
    blank = torch.full((2, 3, 32, 32), 20 / 255)
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["one red circle", "a cyan square above a yellow triangle"]
    assert comp(blank, prompts).max() == 0 and comp(noise, prompts).max() <= 0.25
    torch.testing.assert_close(flat(blank, prompts), torch.ones(2))
    assert flat(noise, prompts).max() < 0.2
    _, renders = sample_pairs(8, seed=13)
    assert flat(renders, ["one red circle"] * 8).min() > 0.95


def test_permissive_mode_scores_unknown_prompts_zero():
    prompts, images = sample_pairs(2, seed=14)
    with pytest.raises(PromptError, match=r"'two pink circles' is outside the embedded grammar: unknown word\(s\) 'pink'"):
        get_reward("composition")(images, ["two pink circles", prompts[1]])
    got = get_reward("composition", permissive=True)(images, ["two pink circles", prompts[1]])
    assert got.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", ["composition", "flatness"])
def test_bad_images_raise(name):
    reward = get_reward(name)
    good = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(2, 32, 32\)"):
        reward(torch.zeros(2, 32, 32), ["one red circle"] * 2)
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        reward(torch.zeros(2, 1, 32, 32), ["one red circle"] * 2)
    with pytest.raises(ValueError, match=r"floating-point images .* torch.uint8; divide uint8 images by 255"):
        reward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["one red circle"] * 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        reward(good.clone().fill_(float("nan")), ["one red circle"] * 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        reward(good.clone().index_fill_(0, torch.tensor([1]), float("inf")), ["one red circle"] * 2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(good, ["one red circle"])


def test_registry_accepts_user_rewards_and_validates_their_output():
    assert {"composition", "flatness"} <= set(list_rewards())
    with pytest.raises(ValueError, match=r"unknown reward 'no-such-reward'; registered rewards: .*composition"):
        get_reward("no-such-reward")

    @register_reward("test-brightness")
    class Brightness:
        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(score(get_reward("test-brightness"), images, ["x"] * 3), images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"returned shape \(2,\); expected \(3,\)"):
        validate_reward_output(torch.zeros(2), 3, "test-brightness")
    with pytest.raises(ValueError, match="1 non-finite score"):
        validate_reward_output(torch.tensor([0.0, float("nan"), 1.0]), 3, "test-brightness")


def test_colour_palette_is_well_separated():
    rgb = np.array(list(COLOURS.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() > 90  # > 2x the verifier's tolerance / 2


def test_centring_known_answers():
    """A centred square scores 1, the same square off centre less, an empty image 0."""
    from mixgrpo.rewards import get_reward
    from mixgrpo.world.grammar import BACKGROUND

    reward = get_reward("centring")
    images = (torch.tensor(BACKGROUND, dtype=torch.float32) / 255).view(1, 3, 1, 1).repeat(3, 1, 32, 32)
    images[0, :, 12:20, 12:20] = 1.0  # centred: centroid (16, 16)
    images[1, :, 8:16, 8:16] = 1.0  # off centre: centroid (12, 12), 4 sqrt(2) px from the centre
    r = reward(images, ["p"] * 3)
    assert r[0].item() == pytest.approx(1.0, abs=1e-6) and r[2].item() == 0.0
    assert r[1].item() == pytest.approx(1 - 4 * 2**0.5 / 16, abs=1e-5)

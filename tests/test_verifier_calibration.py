"""Calibration of the ``composition`` verifier against what an optimiser does to it.

Each family of damaged images (``mixgrpo.world.adversarial``) must stay under its bound,
and the regression set of the first round's hacked samples must score near zero. The
bounds, with the reason a person would give:

- clean renders >= 0.98: a correct picture is correct;
- one attribute changed <= 0.4, one extra object <= 0.4: the wrong picture, some right parts;
- each object a same-colour blob of the same area <= 0.2: colour mass is not a shape;
- 20 speckle pixels <= 0.7: the right scene, visibly dirty (a third of an object's area of junk);
- blur (sigma 1 px) <= 0.6: the right objects, soft edges; never as good as a clean picture;
- smear (3 px), half-drawn, shapes x1.5 / x0.6, colour mass <= 0.2 / 0.05: no recognisable shape;
- the first demo's hacked samples <= 0.15 (verifier v1 gave them ~0.6).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "calibrate_verifier.py"
_spec = importlib.util.spec_from_file_location("calibrate_verifier", _SCRIPT)
calibrate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(calibrate)

from mixgrpo.rewards import get_reward  # noqa: E402
from mixgrpo.world.adversarial import FAMILIES  # noqa: E402


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_stays_within_its_bound(family):
    op, bound = calibrate.BOUNDS[family]
    images, prompts = calibrate.family_batch(family, 200, seed=1)
    mean = round(get_reward("composition")(images, prompts).double().mean().item(), 6)  # float32 sums of 0.2s
    assert (mean >= bound) if op == ">=" else (mean <= bound), f"{family}: mean {mean:.3f}, bound {op} {bound}"


def test_first_demo_hacked_samples_score_near_zero_but_fooled_v1():
    images, prompts = calibrate.hacked_batch()
    assert images.shape == (256, 3, 32, 32)
    assert get_reward("composition")(images, prompts).mean().item() <= calibrate.BOUNDS["hacked (first demo policy)"][1]
    assert get_reward("composition-v1")(images, prompts).mean().item() >= 0.5  # the hack this set records


def test_every_family_has_a_bound_in_the_table():
    assert set(FAMILIES) <= set(calibrate.BOUNDS)


def test_relation_needs_exactly_its_two_objects_and_the_right_layout():
    import numpy as np
    import torch

    from mixgrpo.world import parse_prompt
    from mixgrpo.world.adversarial import perturbed

    spec = parse_prompt("a red circle left of a blue square")
    with_extra = perturbed("one extra object", [spec] * 4, seed=3)
    x = torch.from_numpy(np.ascontiguousarray(with_extra)).permute(0, 3, 1, 2).float() / 255
    assert get_reward("composition")(x, ["a red circle left of a blue square"] * 4).max().item() == pytest.approx(0.4)

"""The procedural world: grammar, split, renderer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mixgrpo.world import (
    COLOURS,
    HELD_OUT_PAIRS,
    RELATIONS,
    SHAPES,
    CountSpec,
    PromptError,
    RelationSpec,
    all_prompts,
    format_prompt,
    parse_prompt,
    perturb_one_attribute,
    render,
    sample_pairs,
    shape_template,
    split_prompts,
)


def test_every_prompt_round_trips():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 72 + 1224
    for p in prompts:
        assert format_prompt(parse_prompt(p)) == p
    assert parse_prompt("  Two  RED circles ") == CountSpec(2, "red", "circle")
    assert parse_prompt("an yellow square above a red circle") == RelationSpec("yellow", "square", "above", "red", "circle")


def test_split_is_disjoint_and_held_out_pairs_never_reach_training():
    train, heldout = split_prompts()
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == sorted(all_prompts())
    assert all(any(pair in HELD_OUT_PAIRS for pair in parse_prompt(p).pairs) for p in heldout)
    assert not any(pair in HELD_OUT_PAIRS for p in train for pair in parse_prompt(p).pairs)
    assert len(heldout) >= 256  # enough for the 256-prompt held-out evaluation


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("two pink circles", r"unknown word\(s\) 'pink'"),
        ("a red hexagon left of a blue square", r"unknown word\(s\) 'hexagon'"),
        ("one red circles", "singular noun for 'one'"),
        ("red circle", "expected '<count> <colour> <shape>s'"),
        ("a red circle left of a red circle", "must differ"),
    ],
)
def test_prompts_outside_the_grammar_raise(text, match):
    with pytest.raises(PromptError, match=match):
        parse_prompt(text)


def test_perturbation_changes_exactly_one_attribute():
    rng = np.random.default_rng(0)
    for p in all_prompts()[::7]:
        spec = parse_prompt(p)
        other = perturb_one_attribute(spec, rng)
        changed = [f for f in spec.__dataclass_fields__ if getattr(spec, f) != getattr(other, f)]
        assert len(changed) == 1
        assert parse_prompt(format_prompt(other)) == other  # still inside the grammar


def test_renders_are_deterministic_and_use_only_world_colours():
    a_prompts, a = sample_pairs(16, seed=3)
    b_prompts, b = sample_pairs(16, seed=3)
    assert a_prompts == b_prompts and (a == b).all()
    _, c = sample_pairs(16, seed=4)
    assert not (a == c).all()
    colours = {tuple(v) for v in COLOURS.values()} | {(20, 20, 20)}
    pixels = {tuple(px) for px in (a * 255).round().permute(0, 2, 3, 1).reshape(-1, 3).int().tolist()}
    assert pixels <= colours


def _components(img: np.ndarray, colour: str) -> list[tuple[slice, slice]]:
    labels, _ = ndimage.label((img == COLOURS[colour]).all(-1), structure=np.ones((3, 3)))
    return ndimage.find_objects(labels)


@pytest.mark.parametrize("relation", RELATIONS)
def test_relation_geometry_is_unambiguous(relation):
    rng = np.random.default_rng(5)
    for size in (24, 32, 48):
        unit = size / 32
        for _ in range(20):
            img = render(RelationSpec("red", "triangle", relation, "blue", "square"), rng, size)
            ys_a, xs_a = np.nonzero((img == COLOURS["red"]).all(-1))
            ys_b, xs_b = np.nonzero((img == COLOURS["blue"]).all(-1))
            dx, dy = xs_b.mean() - xs_a.mean(), ys_b.mean() - ys_a.mean()  # pixel centroids, B from A
            along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
            assert along >= 10 * unit - 1e-9 and abs(across) <= along / 2 + 1e-9, (size, dx, dy)


@pytest.mark.parametrize("size", [24, 32, 48, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_four_objects_are_separate_countable_and_2px_apart(size, shape):
    rng = np.random.default_rng(6)
    for _ in range(10):
        boxes = _components(render(CountSpec(4, "green", shape), rng, size), "green")
        assert len(boxes) == 4
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                gap_y = max(b[0].start - a[0].stop, a[0].start - b[0].stop)
                gap_x = max(b[1].start - a[1].stop, a[1].start - b[1].stop)
                assert max(gap_x, gap_y) >= 2  # background pixels between the bounding boxes


@pytest.mark.parametrize("size", [24, 28, 32, 40, 48, 64, 96, 128])
def test_shape_templates_have_well_separated_fill_ratios(size):
    fill = {s: shape_template(s, size).mean() for s in SHAPES}
    assert fill["square"] == 1.0
    assert 0.74 <= fill["circle"] <= 0.83, fill
    assert 0.45 <= fill["triangle"] <= 0.55, fill
    unit = size / 32
    assert 7.5 * unit <= shape_template("circle", size).shape[0] <= 10.5 * unit + 1


def test_render_bad_size_and_sample_bad_inputs():
    with pytest.raises(ValueError, match="image size must be >= 24"):
        render(CountSpec(1, "red", "circle"), np.random.default_rng(0), size=16)
    with pytest.raises(TypeError, match="pass a CountSpec or RelationSpec"):
        render("one red circle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_pairs(0, seed=0)
    with pytest.raises(ValueError, match="prompt list is empty"):
        sample_pairs(1, seed=0, prompts=[])
    with pytest.raises(PromptError, match="unknown word"):
        sample_pairs(1, seed=0, prompts=["one pink circle"])
    _, big = sample_pairs(2, seed=0, size=48)
    assert big.shape == (2, 3, 48, 48)

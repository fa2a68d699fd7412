"""Time grids, Flash plans and model-pass accounting."""

from __future__ import annotations

import pytest
import torch

from mixgrpo.core.accounting import count_model_passes
from mixgrpo.core.grids import (
    compressed_tail_grid,
    interpolated_tail_grid,
    time_shift,
    uniform_grid,
    validate_grid,
)
from mixgrpo.core.sampler import SamplingPlan, flash_plan, mixed_plan, sample


def test_time_shift_formula_and_fixed_points():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = time_shift(t, 3.0)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted >= t).all()  # shift > 1 spends more steps at high noise


def test_uniform_grid_matches_public_mixgrpo_grid():
    grid = uniform_grid(25, shift=3.0)
    base = torch.linspace(1, 0, 26, dtype=torch.float64)
    torch.testing.assert_close(grid, 3 * base / (1 + 2 * base))
    assert grid.numel() == 26 and grid[0] == 1 and grid[-1] == 0
    # the first four steps (MixGRPO's initial window) cover t in [0.94, 1] after shift 3
    assert grid[4].item() == pytest.approx(3 * 0.84 / (1 + 2 * 0.84))


@pytest.mark.parametrize(
    "bad,match",
    [
        ([1.0, 0.5, 0.5, 0.0], r"strictly decreasing .* t\[1\]=0.5 <= t\[2\]=0.5"),
        ([0.2, 0.5, 0.0], r"t\[0\]=0.2 <= t\[1\]=0.5"),
        ([1.2, 0.5, 0.0], r"t\[0\]=1.2 is outside \[0, 1\]"),
        ([1.0, -0.1], r"t\[1\]=-0.1 is outside \[0, 1\]"),
        ([1.0], "at least 2 points"),
        ([[1.0, 0.0]], "1-D"),
        ([1.0, float("nan"), 0.0], "non-finite"),
    ],
)
def test_invalid_grids_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_grid(torch.tensor(bad))


def test_uniform_grid_bad_arguments():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        uniform_grid(0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        uniform_grid(4, shift=0.0)
    with pytest.raises(ValueError, match="t_end < t_start"):
        uniform_grid(4, t_start=0.2, t_end=0.5)


@pytest.mark.parametrize(("compression", "points"), [(0.4, 8), (0.2, 4), (1.0, 22)])
def test_compressed_tail_grid_sizes(compression, points):
    grid = uniform_grid(25, shift=3.0)
    tail = compressed_tail_grid(25, after_step=3, compression=compression, shift=3.0)
    assert tail.numel() == points
    assert tail[0] == grid[4] and tail[-1] == 0
    if compression == 1.0:  # no compression: the tail is the training grid itself
        torch.testing.assert_close(tail, grid[4:])


def test_flash_plan_structure_and_sampling():
    grid = uniform_grid(25, shift=3.0)
    plan = flash_plan(25, window=[0, 1, 2, 3], compression=0.4, shift=3.0)
    assert plan.kinds == ("sde",) * 4 + ("dpm2",) * 7
    assert plan.window == (0, 1, 2, 3) and plan.sde_steps == (0, 1, 2, 3)
    moved = flash_plan(25, window=[5, 6, 7, 8], compression=0.4, shift=3.0)
    assert moved.kinds[:5] == ("euler",) * 5 and moved.kinds[5:9] == ("sde",) * 4
    torch.testing.assert_close(moved.grid[:10], grid[:10])  # full grid up to the window's end
    assert all(k.startswith("dpm") for k in moved.kinds[9:])


def test_model_passes_for_every_method_at_t25():
    """Derived from the presets themselves (mixgrpo.train.plans); the KL of flow-grpo and
    pro-grpo costs one reference pass per trained step."""
    from mixgrpo.train.plans import preset_model_passes

    got = {n: (p.sampling, p.training, p.reference, p.total) for n, p in preset_model_passes(25).items()}
    assert got == {
        "flow-grpo": (25, 24, 24, 73),
        "dance-grpo": (25, 14, 0, 39),
        "mixgrpo": (25, 4, 0, 29),
        "mixgrpo-cps": (25, 4, 0, 29),
        "mixgrpo-flash": (11, 4, 0, 15),
        "mixgrpo-flash-star": (7, 4, 0, 11),
        "pro-grpo": (25, 24, 24, 73),
        "mixgrpo-prefix": (25, 4, 0, 29),
        "mixgrpo-pro": (25, 4, 0, 29),
        "flow-grpo-guard": (25, 24, 24, 73),
        "nft": (10, 9, 18, 37),  # 9 of its 10 times; an old-policy and a reference pass each
        "awm": (14, 6, 12, 32),  # 6 strata; an EMA and a reference pass each
        # 20 steps, splits 0/3/6/9: 203 node passes and 202 trained edges per 16-leaf tree
        "branch-grpo": (203 / 16, 202 / 16, 0, 405 / 16),
    }
    assert count_model_passes(mixed_plan(uniform_grid(25), [0]), 1, cfg=True).total == 52
    assert count_model_passes(mixed_plan(uniform_grid(25), [0]), 1, cfg=True, kl=True).total == 54


@pytest.mark.parametrize(("after", "compression"), [(3, 0.4), (3, 0.2), (0, 1.0), (10, 0.3)])
def test_interpolated_tail_is_the_compressed_tail_on_an_unshifted_grid(after, compression):
    """Flash's tail for any training grid (a VP model's DDIM times): on ``uniform_grid(T)`` it
    is the reference compression; on any grid it has as many points and keeps its ends."""
    tail = interpolated_tail_grid(uniform_grid(25), after, compression)
    torch.testing.assert_close(tail, compressed_tail_grid(25, after, compression, 1.0), rtol=0, atol=1e-12)
    bent = uniform_grid(25, shift=3.0) ** 1.5  # any decreasing grid
    tail = interpolated_tail_grid(bent, after, compression)
    assert tail.numel() == compressed_tail_grid(25, after, compression, 3.0).numel()
    assert tail[0] == bent[after + 1] and tail[-1] == bent[-1] and bool((tail[1:] < tail[:-1]).all())
    # a Flash plan on that grid: the grid up to the window's end, then the tail
    plan = flash_plan(25, range(after + 1) if after < 4 else range(after - 3, after + 1), compression, 3.0, grid=bent)
    assert torch.equal(plan.grid, torch.cat([bent[: after + 1], tail]))
    with pytest.raises(ValueError, match="needs a grid of 26 times"):
        flash_plan(25, [0, 1], compression, 3.0, grid=bent[:-1])


def test_model_passes_match_velocity_calls():
    calls = []

    def velocity(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    plan = flash_plan(25, [0, 1, 2, 3], 0.4, 3.0)
    from mixgrpo.core.steps import SDENoise

    out = sample(velocity, torch.randn(2, 4), plan, SDENoise())
    assert len(calls) == out.row_passes // 2 == count_model_passes(plan, 4).sampling


def test_plan_bad_inputs():
    grid = uniform_grid(6)
    with pytest.raises(ValueError, match="ends at t=0, where an SDE step has no density"):
        mixed_plan(grid, [5])
    with pytest.raises(ValueError, match=r"SDE step indices must lie in \[0, 5\]"):
        mixed_plan(grid, [6])
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
        mixed_plan(grid, [0], "rk4")
    with pytest.raises(ValueError, match="consecutive"):
        flash_plan(6, [0, 2], 0.4, 3.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
        flash_plan(6, [4, 5], 0.4, 3.0)
    with pytest.raises(ValueError, match=r"compression must be in \(0, 1\]"):
        flash_plan(6, [0, 1], 0.0, 3.0)
    with pytest.raises(ValueError, match="step kinds for a grid of 6 steps"):
        SamplingPlan(grid, ("euler",) * 5)
    with pytest.raises(ValueError, match="num_trained_steps must be in"):
        count_model_passes(mixed_plan(grid, [0]), 2)

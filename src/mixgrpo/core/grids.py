"""Time grids for flow-matching samplers.

Conventions (diffusers / FLUX / SD3): time ``t`` (diffusers' *sigma*) runs from 1 (pure
noise) to 0 (data), ``x_t = (1 - t) x0 + t eps``. A grid is a strictly decreasing 1-D
float64 tensor ``t_0 > t_1 > ... > t_T`` inside ``[0, 1]``; step ``k`` goes from
``t_k`` to ``t_{k+1}``, so ``dt = t_{k+1} - t_k < 0``.
"""

from __future__ import annotations

import torch

__all__ = ["compressed_tail_grid", "interpolated_tail_grid", "time_shift", "uniform_grid", "validate_grid"]


def time_shift(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 / FLUX time shift ``t' = s t / (1 + (s - 1) t)``.

    ``s > 1`` spends more steps at high noise (SD3 uses 3; FLUX a resolution-dependent
    value). Fixes 0 and 1.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def uniform_grid(
    num_steps: int, shift: float = 1.0, t_start: float = 1.0, t_end: float = 0.0
) -> torch.Tensor:
    """``num_steps + 1`` times: ``linspace(t_start, t_end, num_steps + 1)`` then :func:`time_shift`.

    With the defaults ``t_start=1, t_end=0`` this is the grid of the public MixGRPO and
    Flow-GRPO FLUX code (``linspace(1, 0, T + 1)`` then shift). Few-step grids are the same
    call with a small ``num_steps``.

    Returns:
        ``(num_steps + 1,)`` float64 tensor, strictly decreasing.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(
            f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}"
        )
    grid = time_shift(torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64), shift)
    return validate_grid(grid)


def validate_grid(grid: torch.Tensor) -> torch.Tensor:
    """Check that ``grid`` is a strictly decreasing 1-D sequence of times in ``[0, 1]``.

    Returns the grid as float64; raises ``ValueError`` naming the offending value.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(
            f"a time grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}"
        )
    if not torch.isfinite(grid).all():
        raise ValueError(f"time grid has non-finite values: {grid.tolist()}")
    bad = ((grid < 0) | (grid > 1)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"time grid value t[{i}]={grid[i].item():.6g} is outside [0, 1]")
    steps = grid[1:] - grid[:-1]
    bad = (steps >= 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"time grid must be strictly decreasing (noise -> data), but "
            f"t[{i}]={grid[i].item():.6g} <= t[{i + 1}]={grid[i + 1].item():.6g}"
        )
    return grid


def compressed_tail_grid(
    num_steps: int, after_step: int, compression: float, shift: float
) -> torch.Tensor:
    """MixGRPO-Flash's compressed ODE grid after the SDE window.

    With the training grid ``t_k = shift(u_k)``, ``u = linspace(1, 0, T + 1)``, and the
    window's last step ``e`` (ending at ``t_{e+1}``), the public MixGRPO code replaces the
    remaining ``T - e - 1`` steps by ``shift(linspace(u_{e+1}, 0, n))`` with
    ``n = max(int((T - e) r), 1)`` points. It starts exactly at ``t_{e+1}``. With
    ``T = 25, e = 3``: ``r = 0.4`` gives 8 points (7 steps), ``r = 0.2`` gives 4 (3 steps).
    We use at least 2 points so the tail always reaches ``t = 0``.

    Args:
        num_steps: ``T`` of the training grid (built by :func:`uniform_grid`).
        after_step: ``e``, the last step index of the window (``0 <= e <= T - 2``).
        compression: ``r`` in ``(0, 1]``.
        shift: the training grid's time shift.

    Returns:
        ``(n,)`` float64 grid from ``t_{e+1}`` to 0.
    """
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    num_points = _tail_points(num_steps, after_step, compression)
    start = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[after_step + 1].item()
    return validate_grid(time_shift(torch.linspace(start, 0.0, num_points, dtype=torch.float64), shift))


def _tail_points(num_steps: int, after_step: int, compression: float) -> int:
    """``n = max(int((T - e) r), 2)`` points of Flash's tail, after checking ``e`` and ``r``."""
    if not 0 <= after_step <= num_steps - 2:
        raise ValueError(
            f"after_step must be in [0, {num_steps - 2}] for a {num_steps}-step grid, got {after_step}"
        )
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression}")
    return max(int((num_steps - after_step) * compression), 2)


def interpolated_tail_grid(grid: torch.Tensor, after_step: int, compression: float) -> torch.Tensor:
    """MixGRPO-Flash's compressed tail for any training grid (a VP model's DDIM times): as many
    points as :func:`compressed_tail_grid` gives, ``n = max(int((T - e) r), 2)``, at evenly
    spaced fractional step indices from ``e + 1`` to ``T``, the grid interpolated linearly in
    between. It starts at ``grid[e + 1]`` and ends at ``grid[T]`` exactly; on an unshifted
    uniform grid it is :func:`compressed_tail_grid` (up to rounding).

    Returns:
        ``(n,)`` float64 grid.
    """
    grid = validate_grid(grid)
    num_steps = grid.numel() - 1
    num_points = _tail_points(num_steps, after_step, compression)
    where = torch.linspace(after_step + 1, num_steps, num_points, dtype=torch.float64)
    lo = where.floor().long().clamp(max=num_steps - 1)
    tail = grid[lo] + (where - lo) * (grid[lo + 1] - grid[lo])
    tail[0], tail[-1] = grid[after_step + 1], grid[-1]  # the ends exactly, whatever the rounding
    return validate_grid(tail)

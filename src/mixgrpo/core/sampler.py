"""The mixed ODE/SDE sampler every method shares.

A :class:`SamplingPlan` says, for each step of a time grid, whether it is a stochastic
(SDE) step -- GRPO's policy, whose transition density is recorded -- or a deterministic ODE
step (Euler or multistep DPM-Solver++). Flow-GRPO, DanceGRPO, MixGRPO and MixGRPO-Flash are
all plans; :func:`sample` never knows which method it runs, and only sees the model as a
``velocity(x, t) -> v`` callable (``t`` is a ``(B,)`` tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .dpm_solver import DPM_ORDERS, dpm_solver_pp_step
from .grids import compressed_tail_grid, interpolated_tail_grid, uniform_grid, validate_grid
from .steps import (
    LogProbForm,
    Reduction,
    SDENoise,
    euler_step,
    gaussian_log_prob,
    sde_step,
    upcast,
    x0_from_velocity,
)

__all__ = [
    "ODE_SOLVERS",
    "Pruning",
    "Rollout",
    "RowVelocity",
    "SamplingPlan",
    "Transitions",
    "Velocity",
    "concat_rollouts",
    "flash_plan",
    "initial_noise",
    "mixed_plan",
    "sample",
]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ODE_SOLVERS: tuple[str, ...] = ("euler", "dpm1", "dpm2", "dpm3")
_STEP_KINDS = ("sde", *ODE_SOLVERS)


@dataclass(frozen=True)
class SamplingPlan:
    """A time grid and, per step, how to take it.

    Attributes:
        grid: ``(n + 1,)`` float64 times, strictly decreasing.
        kinds: ``n`` entries, each ``"sde"`` or an ODE solver (``"euler"``, ``"dpm1"``,
            ``"dpm2"``, ``"dpm3"``; ``dpmK`` is multistep DPM-Solver++ of order K).
        window: for plans built from a larger training grid (Flash), the indices of the
            SDE steps *in that training grid*; otherwise the SDE step indices of this grid.
    """

    grid: torch.Tensor
    kinds: tuple[str, ...]
    window: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        grid = validate_grid(self.grid)
        object.__setattr__(self, "grid", grid)
        if len(self.kinds) != grid.numel() - 1:
            raise ValueError(
                f"plan has {len(self.kinds)} step kinds for a grid of {grid.numel() - 1} steps"
            )
        for k, kind in enumerate(self.kinds):
            if kind not in _STEP_KINDS:
                raise ValueError(f"unknown step kind {kind!r} at step {k}; choose from {_STEP_KINDS}")
            if kind == "sde" and grid[k + 1].item() <= 0.0:
                raise ValueError(
                    f"step {k} ends at t=0, where an SDE step has no density: it cannot be stochastic"
                )

    @property
    def num_steps(self) -> int:
        return len(self.kinds)

    @property
    def sde_steps(self) -> tuple[int, ...]:
        """Indices (in this plan's grid) of the stochastic steps."""
        return tuple(k for k, kind in enumerate(self.kinds) if kind == "sde")


def mixed_plan(grid: torch.Tensor, sde_steps: Sequence[int], ode_solver: str = "euler") -> SamplingPlan:
    """SDE on ``sde_steps`` of ``grid`` and ``ode_solver`` everywhere else (MixGRPO, and
    Flow-GRPO / DanceGRPO when ``sde_steps`` covers every step but the last)."""
    grid = validate_grid(grid)
    n = grid.numel() - 1
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {ode_solver!r}; choose one of {ODE_SOLVERS}")
    steps = sorted(set(int(k) for k in sde_steps))
    if steps and not 0 <= steps[0] <= steps[-1] < n:
        raise ValueError(f"SDE step indices must lie in [0, {n - 1}], got {steps}")
    kinds = tuple("sde" if k in steps else ode_solver for k in range(n))
    return SamplingPlan(grid=grid, kinds=kinds, window=tuple(steps))


def flash_plan(
    num_steps: int,
    window: Sequence[int],
    compression: float,
    shift: float,
    order: int = 2,
    *,
    grid: torch.Tensor | None = None,
) -> SamplingPlan:
    """MixGRPO-Flash: on the training grid ``uniform_grid(num_steps, shift)``, Euler before
    the window and SDE inside it; after it, multistep DPM-Solver++ of ``order`` on the
    compressed grid of :func:`~mixgrpo.core.grids.compressed_tail_grid`.

    ``grid``: a model's own ``num_steps``-step training grid instead (a VP model's DDIM
    times; ``shift`` is then unused), its tail compressed by
    :func:`~mixgrpo.core.grids.interpolated_tail_grid`.

    ``window`` must be contiguous, e.g. ``(0, 1, 2, 3)``. The DPM-Solver history starts
    fresh after the window (see :func:`sample`); the reference code instead keeps the
    window's x0 predictions in it, which mixes points of different stochastic trajectories
    into one polynomial. The cost is the same: one model pass per step.
    """
    steps = sorted({int(k) for k in window})
    if not steps or steps != list(range(steps[0], steps[-1] + 1)):
        raise ValueError(f"a Flash window must be a non-empty run of consecutive steps, got {list(window)}")
    if order not in DPM_ORDERS:
        raise ValueError(f"DPM-Solver++ order must be one of {DPM_ORDERS}, got {order}")
    own = grid is not None
    grid = validate_grid(grid) if own else uniform_grid(num_steps, shift=shift)
    if grid.numel() != num_steps + 1:
        raise ValueError(f"a {num_steps}-step Flash plan needs a grid of {num_steps + 1} times, got {grid.numel()}")
    start, end = steps[0], steps[-1]
    if steps[0] < 0 or end > num_steps - 2:
        raise ValueError(f"window {steps} must lie in [0, {num_steps - 2}] (before the last step of a {num_steps}-step grid)")
    tail = interpolated_tail_grid(grid, end, compression) if own else compressed_tail_grid(num_steps, end, compression, shift)
    new_grid = torch.cat([grid[: end + 1], tail])  # t_0 ... t_e, then t_{e+1} ... 0
    kinds = ("euler",) * start + ("sde",) * len(steps) + (f"dpm{order}",) * (tail.numel() - 1)
    return SamplingPlan(grid=new_grid, kinds=kinds, window=tuple(steps))


def initial_noise(
    num_groups: int,
    group_size: int,
    shape: Sequence[int],
    *,
    shared: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(num_groups * group_size, *shape)`` standard normal noise, group-contiguous.

    With ``shared=True`` every member of a group starts from the same noise (MixGRPO), so
    the group differs only through the SDE steps.
    """
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"num_groups and group_size must be >= 1, got {num_groups}, {group_size}")
    if shared:
        z = torch.randn(num_groups, 1, *shape, generator=generator, device=device)
        z = z.expand(num_groups, group_size, *shape)
    else:
        z = torch.randn(num_groups, group_size, *shape, generator=generator, device=device)
    return z.reshape(num_groups * group_size, *shape).contiguous()


@dataclass
class Transitions:
    """What the GRPO loss needs from the stochastic steps of a rollout, stacked over
    ``S`` trained steps: ``x``/``x_next`` ``(S, B, ...)``, ``t``/``t_next`` ``(S,)``,
    ``log_prob`` ``(S, B)``."""

    step_index: tuple[int, ...]
    x: torch.Tensor
    x_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor | None = None  # (S, B, ...) the rollout's step means, when recorded (GRPO-Guard)

    def __len__(self) -> int:
        return len(self.step_index)


@dataclass
class Rollout:
    """Result of :func:`sample`: the final ``x0`` and the recorded stochastic transitions."""

    x0: torch.Tensor
    transitions: Transitions | None
    trajectory: list[torch.Tensor] = field(default_factory=list)
    kept: torch.Tensor | None = None  # original row of each output row (pruning drops rows)
    row_passes: int = 0  # model evaluations actually made, summed over rows


class RowVelocity(Protocol):
    """A velocity that can be restricted to some of its rows (its conditioning follows)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def rows(self, index: torch.Tensor) -> RowVelocity: ...


@dataclass(frozen=True)
class Pruning:
    """Expand-and-Prune: at each plan step in ``steps``, after the model pass,
    ``select(step, x0_hat, alive)`` returns the positions (into the current rows) that go on;
    ``x0_hat = x - t v`` is the predicted clean sample, ``alive`` the rows' original indices."""

    steps: frozenset[int]
    select: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(
    velocity: Velocity,
    x_init: torch.Tensor,
    plan: SamplingPlan,
    noise: SDENoise | None = None,
    *,
    reduction: Reduction = "mean",
    log_prob_form: LogProbForm = "gaussian",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    keep_trajectory: bool = False,
    prefix_groups: int | None = None,
    prune: Pruning | None = None,
    record_mean: bool = False,
) -> Rollout:
    """Integrate from ``x_init`` at ``plan.grid[0]`` to ``plan.grid[-1]``.

    ODE steps: Euler, or multistep DPM-Solver++ whose history restarts after every SDE step
    (a multistep history is only valid along one ODE trajectory). SDE steps: drawn from the
    Gaussian of :func:`~mixgrpo.core.steps.sde_moments`; their ``(x, x_next, t, t_next)``
    and old log-prob are recorded for the loss.

    Args:
        velocity: ``velocity(x, t) -> v``, ``t`` a ``(B,)`` tensor.
        x_init: ``(B, ...)`` starting sample (noise when ``grid[0] = 1``).
        plan: the grid and step kinds.
        noise: the SDE form; required when the plan has SDE steps.
        reduction: log-prob reduction over non-batch dims.
        log_prob_form: ``"gaussian"`` or Flow-GRPO's ``"flow_grpo_cps"`` surrogate (the loss
            must use the same form, or the importance ratio is meaningless).
        generator: RNG for the SDE noise; a sequence gives each contiguous block of rows (a
            group) its own stream (see :func:`~mixgrpo.core.steps.standard_noise`).
        keep_trajectory: keep every intermediate sample (for plots and tests).
        prefix_groups: shared-prefix rollouts (BranchGRPO-style): rows come in groups of this
            size that share their initial noise, so every deterministic step before the first
            SDE step is the same for the whole group; they run once per group and the group
            branches at the first SDE step. Needs ``velocity.rows``.
        prune: Expand-and-Prune (Pro-GRPO): at each of ``prune.steps`` the rows kept by
            ``prune.select`` go on and the others stop (no further model passes). Needs
            ``velocity.rows``.
        record_mean: also keep each SDE step's Gaussian mean (GRPO-Guard's ratio needs it).
    """
    if plan.sde_steps and noise is None:
        raise ValueError("the plan has SDE steps, so an SDENoise must be given")
    grid = plan.grid.tolist()
    x = upcast(x_init)
    alive = torch.arange(x.shape[0], device=x.device)  # original rows still being sampled
    branch_at = _check_branching(x, plan, prefix_groups, prune)
    step_velocity = velocity
    if branch_at is not None:
        x = x[:: prefix_groups]
        step_velocity = _rows(velocity, alive[:: prefix_groups])
    history_x0: list[torch.Tensor] = []
    history_t: list[float] = []
    recorded: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "x_next", "log_prob", "mean")}
    trajectory = [x] if keep_trajectory else []
    row_passes = 0
    for k, kind in enumerate(plan.kinds):
        t, t_next = grid[k], grid[k + 1]
        if k == branch_at:  # the shared prefix ends: every member of the group goes its own way
            expand = lambda z: z.repeat_interleave(prefix_groups, dim=0)  # noqa: E731
            x, history_x0 = expand(x), [expand(h) for h in history_x0]
            trajectory = [expand(z) for z in trajectory]
            step_velocity = velocity
        batch = x.shape[0]
        v = step_velocity(x, torch.full((batch,), t, dtype=x.dtype, device=x.device))
        row_passes += batch
        if prune is not None and k in prune.steps:
            keep = prune.select(k, x0_from_velocity(x, v, t), alive)
            x, v, alive = x[keep], v[keep], alive[keep]
            history_x0 = [h[keep] for h in history_x0]
            recorded = {key: [r[keep] for r in rows] for key, rows in recorded.items()}
            trajectory = [z[keep] for z in trajectory]
            step_velocity = _rows(velocity, alive)
        if kind == "sde":
            step = sde_step(x, v, t, t_next, noise, generator=generator)
            recorded["x"].append(x)
            recorded["x_next"].append(step.x_next)
            recorded["log_prob"].append(gaussian_log_prob(step.x_next, step.mean, step.std, reduction, log_prob_form))
            if record_mean:
                recorded["mean"].append(step.mean)
            x_next = step.x_next
            history_x0, history_t = [], []
        elif kind == "euler":
            x_next = euler_step(x, v, t, t_next)
        else:
            history_x0 = [*history_x0[-2:], x0_from_velocity(x, v, t)]
            history_t = [*history_t[-2:], t]
            x_next = dpm_solver_pp_step(x, history_x0, history_t, t_next, order=int(kind[-1]))
        x = x_next
        if keep_trajectory:
            trajectory.append(x)

    transitions = None
    if plan.sde_steps:
        sde = plan.sde_steps
        transitions = Transitions(
            step_index=sde,
            x=torch.stack(recorded["x"]),
            x_next=torch.stack(recorded["x_next"]),
            t=torch.tensor([grid[k] for k in sde], dtype=torch.float32),
            t_next=torch.tensor([grid[k + 1] for k in sde], dtype=torch.float32),
            log_prob=torch.stack(recorded["log_prob"]),
            mean=torch.stack(recorded["mean"]) if record_mean else None,
        )
    return Rollout(x0=x, transitions=transitions, trajectory=trajectory, kept=alive, row_passes=row_passes)


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Rollouts of consecutive blocks of rows (chunks of groups, same plan) as one batch; each
    part's ``kept`` must already index rows of the whole batch."""
    if len(parts) == 1:
        return parts[0]

    def rows(name: str) -> torch.Tensor:
        return torch.cat([getattr(p.transitions, name) for p in parts], dim=1)

    transitions = None
    if parts[0].transitions is not None:
        first = parts[0].transitions
        transitions = Transitions(first.step_index, rows("x"), rows("x_next"), first.t, first.t_next, rows("log_prob"),
                                  rows("mean") if first.mean is not None else None)
    return Rollout(torch.cat([p.x0 for p in parts]), transitions,
                   kept=torch.cat([p.kept for p in parts]), row_passes=sum(p.row_passes for p in parts))


def _rows(velocity: Velocity, index: torch.Tensor) -> Velocity:
    if not hasattr(velocity, "rows"):
        raise ValueError("prefix sharing and pruning need a velocity with a .rows(index) method (see RowVelocity)")
    return velocity.rows(index)


def _check_branching(x: torch.Tensor, plan: SamplingPlan, prefix_groups: int | None, prune: Pruning | None) -> int | None:
    """Validate prefix sharing and pruning; returns the step where a shared prefix branches."""
    first_sde = plan.sde_steps[0] if plan.sde_steps else plan.num_steps
    if prune is not None:
        bad = [k for k in prune.steps if not 0 <= k < plan.num_steps]
        if bad:
            raise ValueError(f"prune steps {bad} lie outside the {plan.num_steps}-step plan")
        if prefix_groups and any(k < first_sde for k in prune.steps):
            raise ValueError(f"prune steps {sorted(prune.steps)} fall in the shared prefix (before step {first_sde}), "
                             "where a group's members are identical")
    if not prefix_groups or prefix_groups == 1:
        return None
    if x.shape[0] % prefix_groups:
        raise ValueError(f"batch {x.shape[0]} is not a multiple of prefix_groups {prefix_groups}")
    if not torch.equal(x, x[::prefix_groups].repeat_interleave(prefix_groups, dim=0)):
        raise ValueError("prefix sharing needs every group to share its initial noise (sampler.shared_noise: true)")
    return first_sde

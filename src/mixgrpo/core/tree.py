"""BranchGRPO's tree rollouts and per-depth advantages (arXiv 2509.06040; its code:
Fredreic1849/BranchGRPO @ 19fbb9f, ``fastvideo/train_branchgrpo_flux.py``).

Each prompt grows one binary tree from one initial noise. At every split step the model
runs once per node; each node then draws two children, ``x' = mean + kappa std xi`` with
independent ``xi`` (``kappa`` = ``split_noise_scale``), while the log-probability is still
that of the unscaled step (as the reference's ``flux_step_with_split``). Between splits
every node steps on its own, so a group of ``G = 2^splits`` leaves shares its prefixes.

Rows are laid out as the trainer's groups: ``P * G`` leaves, group-contiguous; the node of
leaf ``j`` at a level with ``m`` nodes per tree is ``j // (G / m)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampler import Rollout, RowVelocity, SamplingPlan, Transitions
from .steps import (
    Reduction,
    SDENoise,
    euler_step,
    gaussian_log_prob,
    sde_moments,
    standard_noise,
    upcast,
)

__all__ = ["nodes_per_tree", "sample_tree", "tree_advantages", "tree_edge_mask"]


def nodes_per_tree(splits: Sequence[int], step: int) -> int:
    """Children per tree made by ``step`` (2^(splits at or before it)): the nodes at depth
    ``step + 1``, whose edges come out of ``step``."""
    return 2 ** sum(1 for s in splits if s <= step)


def _check(plan: SamplingPlan, splits: Sequence[int], group: int) -> list[int]:
    splits = sorted(int(s) for s in splits)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"tree splits must be distinct step indices, got {list(splits)}")
    if any(plan.kinds[s] != "sde" for s in splits if 0 <= s < plan.num_steps) or not 0 <= splits[0] <= splits[-1] < plan.num_steps:
        raise ValueError(f"every tree split must be an SDE step of the plan; splits {splits}, SDE steps {plan.sde_steps}")
    if any(kind not in ("sde", "euler") for kind in plan.kinds):
        raise ValueError("tree rollouts take SDE and Euler steps only (BranchGRPO and its Mix variant)")
    if group != 2 ** len(splits):
        raise ValueError(f"a binary tree with {len(splits)} splits has {2 ** len(splits)} leaves; the group has {group}")
    return splits


def sample_tree(
    velocity: RowVelocity,
    x_init: torch.Tensor,
    plan: SamplingPlan,
    noise: SDENoise,
    splits: Sequence[int],
    split_noise_scale: float,
    *,
    group_size: int,
    reduction: Reduction = "mean",
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Rollout:
    """Grow one tree per group of ``x_init`` (``(P * G, ...)``, each group's rows equal: its
    root noise). Returns the leaves' ``x0`` and the SDE transitions stacked as
    ``(S, P * G, ...)``: a node's transition repeated on every leaf under it (the trainer
    trains it once, see :func:`tree_advantages`). ``row_passes`` counts one pass per node.
    A sequence of generators gives each tree its own noise stream (rows stay tree-contiguous
    at every level), so a tree does not depend on which others share the batch."""
    splits = _check(plan, splits, group_size)
    if x_init.shape[0] % group_size:
        raise ValueError(f"{x_init.shape[0]} rows are not whole groups of {group_size}")
    grid = plan.grid.tolist()
    x = upcast(x_init[::group_size])  # one root per tree
    per_tree = 1
    recorded: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "x_next", "log_prob")}
    row_passes = 0

    def leaves(z: torch.Tensor, m: int) -> torch.Tensor:  # a level's rows repeated onto its leaves
        return z.repeat_interleave(group_size // m, dim=0)

    for k, kind in enumerate(plan.kinds):
        t, t_next = grid[k], grid[k + 1]
        rows = torch.arange(x_init.shape[0], device=x.device).view(-1, group_size)[:, :: group_size // per_tree]
        v = velocity.rows(rows.reshape(-1))(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        row_passes += x.shape[0]
        if kind == "euler":
            x = euler_step(x, v, t, t_next)
            continue
        mean, std = sde_moments(x, v, t, t_next, noise)
        scale = 1.0
        if k in splits:  # each node draws two children with kappa-scaled noise
            x, mean, per_tree, scale = x.repeat_interleave(2, 0), mean.repeat_interleave(2, 0), per_tree * 2, split_noise_scale
        x_next = mean + scale * std * standard_noise(mean.shape, generator, mean.device, mean.dtype)
        recorded["x"].append(leaves(x, per_tree))
        recorded["x_next"].append(leaves(x_next, per_tree))
        recorded["log_prob"].append(leaves(gaussian_log_prob(x_next, mean, std, reduction), per_tree))
        x = x_next
    sde = plan.sde_steps
    transitions = Transitions(
        step_index=sde, x=torch.stack(recorded["x"]), x_next=torch.stack(recorded["x_next"]),
        t=torch.tensor([grid[k] for k in sde], dtype=torch.float32),
        t_next=torch.tensor([grid[k + 1] for k in sde], dtype=torch.float32),
        log_prob=torch.stack(recorded["log_prob"]),
    ) if sde else None
    return Rollout(x0=leaves(x, per_tree), transitions=transitions, kept=torch.arange(x_init.shape[0], device=x.device),
                   row_passes=row_passes)


def tree_edge_mask(trees: int, group: int, splits: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """``(trees * group, len(steps))`` bool: the one leaf (the first under its node) that trains
    each edge out of ``steps``, so every edge of every tree enters the loss once."""
    mask = torch.zeros(trees, group, len(steps), dtype=torch.bool)
    for j, k in enumerate(steps):
        mask[:, :: group // nodes_per_tree(splits, k), j] = True
    return mask.reshape(trees * group, -1)


def tree_advantages(
    leaf_rewards: torch.Tensor, splits: Sequence[int], steps: Sequence[int], *, eps: float = 1e-8,
    clip: float | None = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BranchGRPO's per-depth advantages on the edges out of ``steps``.

    A node's reward is the mean of its leaves' rewards; the edge out of step ``k`` gets its
    child's advantage, normalised over the ``m`` nodes of that depth in its tree:
    ``(R - mean) / (std + eps)`` with torch's unbiased std, 0 when ``std < 1e-6`` or ``m = 1``,
    then clipped to ``[-clip, clip]``.

    Args:
        leaf_rewards: ``(P, G)`` one row of leaves per tree.
        splits: the split steps.
        steps: the trained SDE steps, in order.

    Returns:
        ``(P * G, len(steps))`` advantages, each node's on every leaf under it, and
        :func:`tree_edge_mask`.
    """
    trees, group = leaf_rewards.shape
    adv = torch.zeros(trees, group, len(steps), dtype=leaf_rewards.dtype)
    for j, k in enumerate(steps):
        m = nodes_per_tree(splits, k)
        nodes = leaf_rewards.reshape(trees, m, group // m).mean(2)  # (P, m)
        if m > 1:
            std = nodes.std(dim=1, keepdim=True)
            a = (nodes - nodes.mean(dim=1, keepdim=True)) / (std + eps)
            a = a.masked_fill(std < 1e-6, 0.0)
            adv[:, :, j] = a.repeat_interleave(group // m, dim=1)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(trees * group, -1), tree_edge_mask(trees, group, splits, steps)

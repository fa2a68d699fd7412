"""Rollouts whose batch changes mid-sampling: shared prefixes and Expand-and-Prune.

Pro-GRPO (arXiv 2512.15347) Expand-and-Prune: start each group with an expanded ``G_e``
members; after the model pass of each prune step, score every member by its predicted clean
sample ``x0_hat = x_t - t v`` and keep the ones whose features are most spread out (OVF in
feature space, :func:`~mixgrpo.core.ovf.max_spread_subset`); the others stop, so they cost no
further model passes. Group sizes shrink linearly from ``G_e`` to ``prune_keep`` over the
prune steps, or as ``sampler.prune_sizes`` lists them (Pro-GRPO's SD setting: 48 -> 32 -> 8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.ovf import max_spread_subset
from ..core.sampler import Pruning, SamplingPlan
from ..models.tiny_dit import TextCondition
from .config import SamplerConfig

__all__ = ["ConditionedVelocity", "make_pruning", "prune_sizes", "spread_features"]


class ConditionedVelocity:
    """A velocity on fixed text conditions whose ``rows`` follow pruning and prefix sharing
    (a :class:`~mixgrpo.core.sampler.RowVelocity`)."""

    def __init__(self, velocity: Callable[[torch.Tensor, torch.Tensor, TextCondition], torch.Tensor], cond: TextCondition):
        self.velocity, self.cond = velocity, cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t, self.cond)

    def rows(self, index: torch.Tensor) -> ConditionedVelocity:
        return ConditionedVelocity(self.velocity, self.cond.index(index))


def prune_sizes(expanded: int, keep: int, num_prunes: int) -> list[int]:
    """Group sizes after each of ``num_prunes`` prunes, shrinking linearly from ``expanded``
    to ``keep`` (the last prune always reaches ``keep``)."""
    return [round(expanded - (expanded - keep) * (i + 1) / num_prunes) for i in range(num_prunes)]


def spread_features(x0_hat: torch.Tensor) -> torch.Tensor:
    """Pruning features of predicted clean samples: 8x8 average-pooled, flattened. Coarse on
    purpose: early ``x0_hat`` is blurry, and layout and colour are what separate rewards. Video
    latents ``(B, C, F, H, W)`` pool each frame (channels and frames side by side)."""
    return torch.nn.functional.adaptive_avg_pool2d(x0_hat.float().flatten(1, -3), 8).flatten(1)


def make_pruning(plan: SamplingPlan, sampler: SamplerConfig, expanded: int) -> Pruning | None:
    """The :class:`Pruning` of ``sampler.prune_offsets`` for this plan (offsets count from its
    first SDE step), or None. Groups are rows ``// expanded`` of the original batch."""
    if not sampler.prune_offsets:
        return None
    sde = plan.sde_steps
    if not sde:
        raise ValueError("Expand-and-Prune needs SDE steps: the members of a group only differ through them")
    steps = sorted(sde[0] + o for o in sampler.prune_offsets)
    if steps[-1] > sde[-1]:
        raise ValueError(f"prune step {steps[-1]} (sampler.prune_offsets {sampler.prune_offsets}) falls after the "
                         f"window's last SDE step {sde[-1]}; use offsets <= {sde[-1] - sde[0]}")
    sizes = dict(zip(steps, sampler.prune_sizes or prune_sizes(expanded, sampler.prune_keep, len(steps)), strict=True))

    def select(step: int, x0_hat: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        groups, features = (alive // expanded).cpu(), spread_features(x0_hat).cpu()  # tiny: choose on the CPU
        keep = []
        for g in groups.unique(sorted=True):
            members = (groups == g).nonzero().squeeze(1)
            keep.append(members[max_spread_subset(features[members], min(sizes[step], members.numel()))])
        return torch.cat(keep).to(alive.device)

    return Pruning(frozenset(steps), select)

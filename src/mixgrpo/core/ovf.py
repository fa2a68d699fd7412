"""Optimal Variance Filtering (Pro-GRPO, arXiv 2512.15347).

Many trajectories of a group land near the group mean and carry almost no advantage. OVF
keeps the ``k`` of ``G`` rewards whose (population) variance is maximal:

    S* = argmax_{|S| = k} Var({r_i : i in S})

For real numbers a max-variance k-subset is always the ``j`` largest plus the ``k - j``
smallest values for some ``j`` (swapping any interior element for an unused extreme one
never lowers the variance), so scanning ``j = 0..k`` over the sorted rewards is exact in
``O(G log G + k)`` with prefix sums.
"""

from __future__ import annotations

import torch

__all__ = ["max_spread_subset", "max_variance_subset"]


def max_variance_subset(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` rewards with maximum variance.

    Args:
        rewards: ``(G,)`` finite values.
        k: subset size, ``1 <= k <= G``.

    Returns:
        ``(k,)`` int64 indices into ``rewards``, sorted ascending. Ties are broken toward
        the smallest ``j`` (fewest top values), deterministically.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or Inf")
    g = rewards.numel()
    if not isinstance(k, int) or not 1 <= k <= g:
        raise ValueError(f"k must be an integer in [1, G={g}], got {k!r}")
    order = torch.argsort(rewards, stable=True)
    r = rewards[order]
    # Prefix sums of values and squares, to score each j in O(1).
    csum = torch.cat([r.new_zeros(1), r.cumsum(0)])
    csq = torch.cat([r.new_zeros(1), (r * r).cumsum(0)])
    j = torch.arange(k + 1)  # number taken from the top
    low = k - j  # number taken from the bottom
    s1 = csum[low] + (csum[g] - csum[g - j])
    s2 = csq[low] + (csq[g] - csq[g - j])
    variance = s2 / k - (s1 / k) ** 2
    best = int(torch.argmax(variance))
    chosen = torch.cat([order[: k - best], order[g - best :]])
    return torch.sort(chosen).values


def max_spread_subset(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` ``(n, d)`` chosen to keep their spread (total
    variance ``(1/k) sum_i ||f_i - mu||^2``) high: OVF in a feature space (Pro-GRPO's pruning
    from latents).

    Greedy backward elimination: removing row ``i`` from a set of ``n`` leaves the sum of
    squared deviations ``SS - n/(n-1) ||f_i - mu||^2``, so the best single removal is always
    the row nearest the centroid -- the most "clustered" trajectory. Repeat until ``k`` rows
    remain. Exact for one removal; a greedy approximation beyond (the exact vector problem is
    combinatorial). Returns sorted int64 indices; ties go to the lower index.
    """
    features = torch.as_tensor(features, dtype=torch.float64).flatten(1)
    n = features.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf")
    alive = list(range(n))
    while len(alive) > k:
        sub = features[alive]
        dist = (sub - sub.mean(0)).pow(2).sum(1)
        alive.pop(int(torch.argmin(dist)))
    return torch.tensor(alive, dtype=torch.int64)

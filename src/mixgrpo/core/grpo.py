"""The GRPO objective: group-relative advantages and the PPO-clipped policy loss.

Rewards are laid out group-contiguous: ``N = num_groups * G`` samples, group ``g`` owning
rows ``g*G ... g*G + G - 1`` (as :func:`~mixgrpo.core.sampler.initial_noise` lays them out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "MULTI_REWARD_MODES",
    "STD_MODES",
    "Advantages",
    "group_advantages",
    "multi_reward_advantages",
    "ppo_clip_loss",
    "ppo_clip_terms",
]

StdMode = Literal["group", "global"]
STD_MODES: tuple[str, ...] = ("group", "global")
MultiRewardMode = Literal["sum_then_normalize", "normalize_then_sum"]
MULTI_REWARD_MODES: tuple[str, ...] = ("sum_then_normalize", "normalize_then_sum")


@dataclass(frozen=True)
class Advantages:
    """Per-sample advantages and which samples carry signal.

    ``valid`` is False for every member of a group whose rewards have zero variance
    (those groups teach nothing; their advantage is 0 and the trainer skips them).
    """

    advantages: torch.Tensor  # (N,)
    valid: torch.Tensor  # (N,) bool
    num_zero_variance_groups: int
    per_step: torch.Tensor | None = None  # (N, S): one advantage per trained step (BranchGRPO's tree edges)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    rewards = torch.as_tensor(rewards)
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # float64 stays float64
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size must be >= 1 and divide the number of rewards ({rewards.numel()}), got {group_size}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or Inf; check the reward function's output")
    return rewards.view(-1, group_size)


def _normalize(
    grouped: torch.Tensor, std_mode: StdMode, eps: float, *, trimmed_ratio: float = 0.0, unbiased: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r - mean_group) / (std + eps)`` and the per-group zero-variance mask.

    Population std (ddof 0, Flow-GRPO's ``np.std``) unless ``unbiased`` (ddof 1, torch's
    ``.std()`` as MixGRPO / DanceGRPO); ``global`` uses one std over the whole batch
    (Flow-GRPO's ``global_std``) but keeps per-group means. ``trimmed_ratio`` (MixGRPO's
    option, Tencent-Hunyuan/MixGRPO @ e5cdd6a ``train_grpo_flux.py``): each group's mean and
    std come from its rewards without the ``min(int(G * ratio), G - 1)`` lowest ones.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"unknown std mode {std_mode!r}; choose one of {STD_MODES}")
    if not 0 <= trimmed_ratio < 1:
        raise ValueError(f"trimmed_ratio must be in [0, 1), got {trimmed_ratio}")
    size = grouped.shape[1]
    trim = min(int(size * trimmed_ratio), size - 1)
    kept = grouped.sort(dim=1).values[:, trim:] if trim else grouped
    if unbiased and kept.shape[1] < 2:
        raise ValueError(f"an unbiased std needs >= 2 rewards per group after trimming, got {kept.shape[1]}")
    mean = kept.mean(dim=1, keepdim=True)
    group_std = kept.std(dim=1, unbiased=unbiased, keepdim=True)
    std = group_std if std_mode == "group" else grouped.std(unbiased=unbiased).expand_as(group_std)
    zero_var = (grouped.std(dim=1, unbiased=False) <= 1e-12)
    return (grouped - mean) / (std + eps), zero_var


def _finish(adv: torch.Tensor, zero_var: torch.Tensor, clip: float | None) -> Advantages:
    group_size = adv.shape[1]
    adv = adv.masked_fill(zero_var.unsqueeze(1), 0.0)
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"advantage clip must be > 0, got {clip}")
        adv = adv.clamp(-clip, clip)
    valid = (~zero_var).repeat_interleave(group_size)
    return Advantages(adv.reshape(-1), valid, int(zero_var.sum()))


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    std_mode: StdMode = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    trimmed_ratio: float = 0.0,
    unbiased: bool = False,
) -> Advantages:
    """GRPO advantages ``A_i = (r_i - mean_group) / (std + eps)``, clipped to ``[-clip, clip]``.

    Args:
        rewards: ``(N,)`` group-contiguous rewards.
        group_size: ``G``.
        std_mode: ``"group"`` (std within each group) or ``"global"`` (one std over the batch).
        eps: added to the std (1e-4 as the reference code).
        clip: ``A_max``; ``None`` for no clipping (MixGRPO uses 5).
        trimmed_ratio: share of each group's lowest rewards left out of its mean and std.
        unbiased: ddof-1 std (MixGRPO, DanceGRPO) instead of the population std (Flow-GRPO).
    """
    adv, zero_var = _normalize(_grouped(rewards, group_size), std_mode, eps, trimmed_ratio=trimmed_ratio,
                               unbiased=unbiased)
    return _finish(adv, zero_var, clip)


def multi_reward_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_size: int,
    *,
    mode: MultiRewardMode = "normalize_then_sum",
    std_mode: StdMode = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    trimmed_ratio: float = 0.0,
    unbiased: bool = False,
) -> Advantages:
    """Advantages from several rewards ``r^(j)`` with weights ``w_j``.

    - ``"sum_then_normalize"`` (Flow-GRPO): ``A = normalize(sum_j w_j r^(j))``.
    - ``"normalize_then_sum"`` (MixGRPO / DanceGRPO multi-reward):
      ``A = sum_j (w_j / sum_k w_k) normalize(r^(j))``; a group counts as zero-variance
      only if every reward is constant in it.
    """
    if mode not in MULTI_REWARD_MODES:
        raise ValueError(f"unknown multi-reward mode {mode!r}; choose one of {MULTI_REWARD_MODES}")
    if not rewards:
        raise ValueError("at least one reward is needed")
    if set(rewards) != set(weights):
        raise ValueError(
            f"reward names {sorted(rewards)} and weight names {sorted(weights)} must match"
        )
    total = float(sum(weights.values()))
    if any(w < 0 for w in weights.values()) or not total > 0:
        raise ValueError(f"reward weights must be >= 0 with a positive sum, got {dict(weights)}")
    names = sorted(rewards)
    if mode == "sum_then_normalize":
        combined = sum(weights[n] * _grouped(rewards[n], group_size).reshape(-1) for n in names)
        return group_advantages(combined, group_size, std_mode=std_mode, eps=eps, clip=clip,
                                trimmed_ratio=trimmed_ratio, unbiased=unbiased)
    adv_sum, zero_all = None, None
    for n in names:
        adv, zero_var = _normalize(_grouped(rewards[n], group_size), std_mode, eps, trimmed_ratio=trimmed_ratio,
                                   unbiased=unbiased)
        adv = adv.masked_fill(zero_var.unsqueeze(1), 0.0) * (weights[n] / total)
        adv_sum = adv if adv_sum is None else adv_sum + adv
        zero_all = zero_var if zero_all is None else zero_all & zero_var
    return _finish(adv_sum, zero_all, clip)


def ppo_clip_terms(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped GRPO loss per element (per sample of one trained step):

        rho = exp(log p_theta - log p_old)
        L   = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))

    Args:
        log_prob: ``(...)`` log-probs under the current parameters (differentiable).
        old_log_prob: same shape, from the rollout.
        advantages: broadcastable to ``log_prob`` (e.g. ``(B,)`` against ``(B,)``).
        clip_range: ``eps`` (1e-4 with mean-reduced log-probs as MixGRPO).

    Returns:
        ``L`` shaped like ``log_prob`` and detached stats (means): ``ratio_mean``,
        ``clip_frac``, ``approx_kl``.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return terms, stats


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`ppo_clip_terms` averaged over every element (samples x trained steps)."""
    terms, stats = ppo_clip_terms(log_prob, old_log_prob, advantages, clip_range)
    return terms.mean(), stats

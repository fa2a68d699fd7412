"""GRPO advantages, multi-reward fusion, the PPO-clipped loss and KL, against hand values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mixgrpo.core.grpo import group_advantages, multi_reward_advantages, ppo_clip_loss
from mixgrpo.core.objective import gaussian_kl
from mixgrpo.core.ovf import max_variance_subset


def test_group_advantages_by_hand():
    # group 1: mean 2, population std sqrt(2/3); group 2: mean 10, std sqrt(8/3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 8.0, 10.0, 12.0])
    adv = group_advantages(rewards, 3, eps=0.0)
    s1, s2 = math.sqrt(2 / 3), math.sqrt(8 / 3)
    expected = torch.tensor([-1 / s1, 0.0, 1 / s1, -2 / s2, 0.0, 2 / s2])
    torch.testing.assert_close(adv.advantages, expected)
    assert adv.valid.all() and adv.num_zero_variance_groups == 0


def test_global_std_uses_one_std_over_the_batch():
    rewards = torch.tensor([1.0, 2.0, 3.0, 8.0, 10.0, 12.0])
    adv = group_advantages(rewards, 3, std_mode="global", eps=0.0)
    std = rewards.std(unbiased=False)
    expected = torch.tensor([-1.0, 0.0, 1.0, -2.0, 0.0, 2.0]) / std
    torch.testing.assert_close(adv.advantages, expected)


def test_zero_variance_groups_are_counted_and_skipped():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 3)
    assert adv.num_zero_variance_groups == 1
    assert adv.valid.tolist() == [False, False, False, True, True, True]
    assert adv.advantages[:3].abs().sum() == 0


def test_advantage_clip():
    rewards = torch.tensor([0.0] * 99 + [1.0])  # the outlier's z-score is ~9.95
    adv = group_advantages(rewards, 100, clip=5.0, eps=0.0)
    assert adv.advantages.max().item() == pytest.approx(5.0)
    assert adv.advantages.min().item() == pytest.approx(-1 / math.sqrt(99), rel=1e-6)


def test_multi_reward_modes_by_hand():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    b = torch.tensor([10.0, 10.0, 30.0, 10.0])
    sum_first = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, 4,
                                        mode="sum_then_normalize", eps=0.0)
    combined = a + 0.5 * b
    expected = (combined - combined.mean()) / combined.std(unbiased=False)
    torch.testing.assert_close(sum_first.advantages, expected)

    norm_first = multi_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, 4,
                                         mode="normalize_then_sum", eps=0.0)
    za = (a - a.mean()) / a.std(unbiased=False)
    zb = (b - b.mean()) / b.std(unbiased=False)
    torch.testing.assert_close(norm_first.advantages, (2 / 3) * za + (1 / 3) * zb)


def test_normalize_then_sum_keeps_groups_where_any_reward_varies():
    a = torch.tensor([1.0, 1.0, 0.0, 1.0])
    b = torch.tensor([2.0, 2.0, 5.0, 5.0])  # group 1 constant in both, group 2 varies in both
    adv = multi_reward_advantages({"a": a, "b": b}, {"a": 1, "b": 1}, 2)
    assert adv.valid.tolist() == [False, False, True, True]
    c = torch.tensor([3.0, 4.0, 5.0, 5.0])  # group 1 varies in c only
    adv = multi_reward_advantages({"a": a, "c": c}, {"a": 1, "c": 1}, 2)
    assert adv.valid.tolist() == [True, True, True, True]


def test_ppo_clip_loss_by_hand():
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5])
    lp_old = torch.zeros(4)
    lp_new = torch.log(ratio).requires_grad_(True)
    loss, stats = ppo_clip_loss(lp_new, lp_old, adv, clip_range=0.2)
    # per element: max(-A r, -A clip(r)) with clip(r) in [0.8, 1.2]
    expected = torch.tensor([max(-1.5, -1.2), max(1.5, 1.2), max(-1.0, -1.6), max(1.0, 1.6)]).mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clip_frac"].item() == 1.0
    loss.backward()
    # gradient flows only where the unclipped term is the max: elements 1 and 2
    assert (lp_new.grad != 0).tolist() == [False, True, True, False]


def test_ratio_one_makes_clipped_loss_equal_unclipped_and_zero_advantage_zero_gradient():
    lp = torch.randn(8, requires_grad=True)
    adv = torch.randn(8)
    loss, stats = ppo_clip_loss(lp, lp.detach(), adv, clip_range=1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["ratio_mean"].item() == 1.0
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 8)  # d/dlp of -A exp(lp - lp_old) at ratio 1

    lp2 = torch.randn(8, requires_grad=True)
    loss2, _ = ppo_clip_loss(lp2, lp2.detach() + 0.3, torch.zeros(8), clip_range=0.2)
    loss2.backward()
    assert lp2.grad.abs().sum() == 0


def test_gaussian_kl_by_hand():
    mean = torch.zeros(2, 4)
    ref = torch.ones(2, 4)
    std = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "mean"), torch.tensor([0.5, 0.125]))
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "sum"), torch.tensor([2.0, 0.5]))
    # equals the KL of torch.distributions for equal stds
    p = torch.distributions.Normal(mean, std.view(-1, 1))
    q = torch.distributions.Normal(ref, std.view(-1, 1))
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "sum"), torch.distributions.kl_divergence(p, q).sum(1))


@pytest.mark.parametrize("group_size", [2, 5, 8, 12])
def test_ovf_matches_brute_force(group_size):
    gen = torch.Generator().manual_seed(group_size)
    for trial in range(6):
        rewards = torch.randn(group_size, generator=gen)
        if trial % 2:  # ties and repeated values
            rewards = torch.round(rewards * 2) / 2
        for k in range(1, group_size + 1):
            chosen = max_variance_subset(rewards, k)
            best = max(
                rewards[list(s)].var(unbiased=False).item()
                for s in itertools.combinations(range(group_size), k)
            )
            assert len(set(chosen.tolist())) == k
            assert rewards[chosen].var(unbiased=False).item() == pytest.approx(best, abs=1e-9)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, G=4\], got 5"):
        max_variance_subset(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        max_variance_subset(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="divide the number of rewards"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        group_advantages(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="unknown std mode 'batch'"):
        group_advantages(torch.zeros(4), 2, std_mode="batch")
    with pytest.raises(ValueError, match="unknown multi-reward mode"):
        multi_reward_advantages({"a": torch.zeros(2)}, {"a": 1}, 2, mode="average")
    with pytest.raises(ValueError, match="must match"):
        multi_reward_advantages({"a": torch.zeros(2)}, {"b": 1}, 2)
    with pytest.raises(ValueError, match="positive sum"):
        multi_reward_advantages({"a": torch.zeros(2)}, {"a": 0}, 2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo_clip_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)

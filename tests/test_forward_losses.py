"""DiffusionNFT and AWM: each term against an independent transcription of its reference
code, in float64 on random tensors, plus known answers.

References:
- NVlabs/DiffusionNFT @ 24af5554898d85e93efa492f42b5e9cdf4156e9b, ``scripts/train_nft_sd3.py``
  (the policy loss after ``# normalize advantage``, the KL to the base, ``return_decay``).
- scxue/advantage_weighted_matching @ be5137232e33a21b449ed65a533211d0deb97ed8,
  ``advantage_weighted_matching/scripts/train_sd3_awm.py`` (``compute_log_prob_awm``, the
  ``exp_first`` loss, the ``discrete_wo_init`` time draw).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mixgrpo.core.forward_losses import (
    awm_log_likelihood,
    awm_loss,
    flow_matching_target,
    forward_noise,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    velocity_regulariser,
)
from mixgrpo.core.windows import WindowSchedule

B, SHAPE = 6, (3, 5, 5)


def _tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    x0, eps, v, v_old, v_ref = (torch.randn(B, *SHAPE, generator=g, dtype=torch.float64) for _ in range(5))
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 3
    return x0, eps, v, v_old, v_ref, t, adv


def _reference_nft(x0, eps, v, v_old, v_ref, t, adv, beta, adv_clip_max, kl_beta):
    """The reference's lines, restated: r from the clipped advantage, implicit positive and
    negative predictions, x0-space errors over their detached mean |error|, factor A_max / beta,
    plus ``train.beta * mean (v - v_ref)^2``. The batch mean is left out (ours is per sample)."""
    te = t.view(-1, 1, 1, 1)
    xt = (1 - te) * x0 + te * eps
    a = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    r = torch.clamp((a / adv_clip_max) / 2.0 + 0.5, 0, 1)
    pos = beta * v + (1 - beta) * v_old.detach()
    neg = (1.0 + beta) * v_old.detach() - beta * v
    dims = (1, 2, 3)
    x0p = xt - te * pos
    with torch.no_grad():
        wp = torch.abs(x0p.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    lp = ((x0p - x0) ** 2 / wp).mean(dim=dims)
    x0n = xt - te * neg
    with torch.no_grad():
        wn = torch.abs(x0n.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    ln = ((x0n - x0) ** 2 / wn).mean(dim=dims)
    policy = (r * lp / beta + (1.0 - r) * ln / beta) * adv_clip_max
    return policy + kl_beta * ((v - v_ref) ** 2).mean(dim=dims)


@pytest.mark.parametrize(("seed", "beta"), [(0, 1.0), (1, 0.1), (2, 0.5)])
def test_nft_loss_and_gradient_match_the_reference(seed, beta):
    x0, eps, v, v_old, v_ref, t, adv = _tensors(seed)
    v_ours = v.clone().requires_grad_()
    v_ref_code = v.clone().requires_grad_()
    x_t = forward_noise(x0, eps, t)
    r = optimality_probability(adv, 5.0)
    ours = nft_loss(v_ours, v_old, x_t, x0, t, r, beta, 5.0) + 1e-4 * velocity_regulariser(v_ours, v_ref)
    theirs = _reference_nft(x0, eps, v_ref_code, v_old, v_ref, t, adv, beta, 5.0, 1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(v_ours.grad, v_ref_code.grad, rtol=1e-12, atol=1e-12)


def test_nft_known_answers():
    """At v = v_old a neutral sample (r = 1/2) pulls nowhere: the positive and negative terms
    cancel. A fully positive one (r = 1, beta = 1) is the adaptive flow-matching loss times A_max,
    whose gradient points from v towards the target u = eps - x0."""
    x0, eps, v, _, _, t, _ = _tensors(3)
    x_t = forward_noise(x0, eps, t)
    v = v.clone().requires_grad_()
    nft_loss(v, v.detach(), x_t, x0, t, torch.full((B,), 0.5, dtype=torch.float64), 1.0, 5.0).sum().backward()
    assert v.grad.abs().max().item() < 1e-12
    v.grad = None
    loss = nft_loss(v, v.detach(), x_t, x0, t, torch.ones(B, dtype=torch.float64), 1.0, 5.0)
    loss.sum().backward()
    u = flow_matching_target(x0, eps)
    te = t.view(-1, 1, 1, 1)
    err = te * (u - v.detach())  # x0_hat - x0 = t (u - v)
    expected = 5.0 * (err**2).mean(dim=(1, 2, 3)) / err.abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert ((v.grad * (u - v.detach())).sum(dim=(1, 2, 3)) < 0).all()  # descent moves v towards u


def test_optimality_probability_and_decay_match_the_reference():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    assert optimality_probability(adv, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])

    def return_decay(step, decay_type):  # the reference's function, restated
        flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
        return 0.0 if step < flat else min((step - flat) * uprate, uphold)

    for decay_type, args in ((1, (0, 0.001, 0.5)), (2, (75, 0.0075, 0.999))):
        for step in (1, 2, 74, 75, 76, 300, 499, 500, 501, 10_000):
            assert old_policy_decay(step, *args) == return_decay(step, decay_type)


def _reference_awm_log_prob(v, x0, eps, t, weighting, power):
    """``compute_log_prob_awm`` restated after the model call."""
    lp = -(v.double() - (eps.double() - x0.double())) ** 2
    lp = lp.mean(dim=tuple(range(1, lp.ndim)))
    if weighting == "t":
        return lp * t
    if weighting == "t2":
        return lp * t**2
    if weighting == "uniform":
        return lp
    return -(torch.pow(-lp + 1e-10, power) - torch.pow(torch.tensor(1e-10, dtype=lp.dtype), power)) * t / power


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "ghuber"])
def test_awm_log_likelihood_and_loss_match_the_reference(weighting):
    x0, eps, v, _, _, t, adv = _tensors(4)
    u = flow_matching_target(x0, eps)
    ll = awm_log_likelihood(v, u, t, weighting, 0.25)
    torch.testing.assert_close(ll, _reference_awm_log_prob(v, x0, eps, t, weighting, 0.25), rtol=1e-12, atol=0)
    # exp_first with on-policy old log-probs (``old_log_probs = log_prob.detach()``), clip 1,
    # advantages clamp(A, -5, 5) / 5 * advantage_max (1)
    va, vb = v.clone().requires_grad_(), v.clone().requires_grad_()
    ours, _ = awm_loss(awm_log_likelihood(va, u, t, weighting, 0.25), adv, 5.0, 1.0)
    lp = _reference_awm_log_prob(vb, x0, eps, t, weighting, 0.25)
    ratio = torch.exp(lp - lp.detach())
    a = torch.clamp(adv, -5, 5) / 5 * 1.0
    theirs = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - 1.0, 1.0 + 1.0))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(va.grad, vb.grad, rtol=1e-12, atol=1e-15)


def test_awm_stratified_times_match_discrete_wo_init():
    """14 sampler steps, fraction 0.9, 6 train times: the reference's strata of grid indices
    are [1, 2), [2, 4), [4, 6), [6, 8), [8, 10), [10, 12); each sample draws one index in each."""
    sched = WindowSchedule("stratified", num_steps=14, size=6, low=1, fraction=0.9, final_step=True, seed=3)
    bounds = torch.linspace(1, int(14 * 0.9), steps=7).long().tolist()  # the reference's boundaries
    assert bounds == [1, 2, 4, 6, 8, 10, 12]
    mask = sched.sample_steps(0, list(range(64)))
    assert mask.shape == (64, 14) and (mask.sum(1) == 6).all()
    for lo, hi in itertools.pairwise(bounds):
        assert (mask[:, lo:hi].sum(1) == 1).all()
    assert len({tuple(np.flatnonzero(m)) for m in mask}) > 1  # per-sample draws
    assert not mask[:, 0].any() and not mask[:, 12:].any()
    assert sched.steps(0) == tuple(range(1, 12))


def test_nft_random_subset_takes_9_of_10_times_per_sample():
    """DiffusionNFT: a fresh permutation of the 10 grid times per sample, the first
    ``int(10 * 0.99) = 9`` train; the final step's time is one of the candidates."""
    sched = WindowSchedule("random_subset", num_steps=10, fraction=0.99, per_sample=True, final_step=True, seed=0)
    mask = sched.sample_steps(0, list(range(40)))
    assert mask.shape == (40, 10) and (mask.sum(1) == 9).all()
    assert (~mask).any(0).all()  # every time, the last included, is sometimes the one left out

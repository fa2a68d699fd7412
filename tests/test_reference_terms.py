"""Each reference term against an independent transcription of the reference code's formula,
on random float64 tensors at tight tolerance. The transcriptions below are written from the
reference source (repository, file and commit in each docstring), not from our modules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixgrpo.core.grids import uniform_grid
from mixgrpo.core.grpo import group_advantages, multi_reward_advantages
from mixgrpo.core.objective import LossSpec, gaussian_kl, kl_std, step_loss
from mixgrpo.core.steps import SDENoise, gaussian_log_prob, sde_moments
from mixgrpo.core.windows import WindowSchedule
from mixgrpo.train.presets import make_preset

TIGHT = dict(rtol=1e-12, atol=1e-12)
GRID = uniform_grid(25, shift=3.0)  # float64, t_0 = 1


def _draw(seed: int, batch: int = 3, shape=(4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen, dtype=torch.float64) for _ in range(4)]


# ---------------------------------------------------------------- Flow-GRPO, transcribed
def _flow_grpo_sde(sample, v, sigma, sigma_prev, sigma_max, level, prev_sample=None):
    """yifan123/flow_grpo @ 54809b5, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
    ``sde_step_with_logprob`` with sde_type='sde': returns (log_prob, prev_sample_mean, std_dev_t)."""
    sigma = torch.full((sample.shape[0], 1, 1, 1), sigma, dtype=torch.float64)
    sigma_prev = torch.full_like(sigma, sigma_prev)
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma))) * level
    prev_mean = sample * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = (-((prev_sample - prev_mean) ** 2) / (2 * step_std**2) - torch.log(step_std)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=torch.float64))))
    return log_prob.mean(dim=(1, 2, 3)), prev_mean, std_dev_t


def _flow_grpo_cps(sample, v, sigma, sigma_prev, level, prev_sample):
    """yifan123/flow_grpo @ 54809b5, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
    sde_type='cps': log_prob = -mean((prev - mean)^2), "remove all constants"."""
    std_dev_t = sigma_prev * math.sin(level * math.pi / 2)
    x0 = sample - sigma * v
    x1 = sample + v * (1 - sigma)
    prev_mean = x0 * (1 - sigma_prev) + x1 * math.sqrt(sigma_prev**2 - std_dev_t**2)
    log_prob = -((prev_sample - prev_mean) ** 2)
    return log_prob.mean(dim=(1, 2, 3)), prev_mean, std_dev_t


def _flow_grpo_loss(log_prob, old_log_prob, adv, clip_range, beta, prev_mean, prev_mean_ref, std_dev_t, adv_clip=5.0):
    """yifan123/flow_grpo @ ac4c86e, scripts/train_sd3.py (training loop, ~l. 878-897)."""
    advantages = torch.clamp(adv, -adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped, clipped))
    kl_loss = ((prev_mean - prev_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    return policy_loss + beta * torch.mean(kl_loss), torch.mean(kl_loss)


@pytest.mark.parametrize("k", [0, 1, 7, 23])  # k = 0 is the t = 1 step (sigma_max in the denominator)
def test_flow_grpo_kl_and_loss_match_train_sd3(k):
    x, v, v_ref, eps = _draw(100 + k)
    t, t_next = GRID[k].item(), GRID[k + 1].item()
    noise = SDENoise("flow_grpo", 0.7)
    mean, std = sde_moments(x, v, t, t_next, noise)
    x_next = mean + std * eps
    ref_lp, ref_mean, ref_std_dev_t = _flow_grpo_sde(x, v, t, t_next, GRID[1].item(), 0.7, x_next)
    _, ref_mean_ref, _ = _flow_grpo_sde(x, v_ref, t, t_next, GRID[1].item(), 0.7, x_next)
    old = ref_lp + 1e-4 * torch.randn(3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    adv = torch.tensor([-7.0, 0.3, 2.0], dtype=torch.float64)
    expected, expected_kl = _flow_grpo_loss(ref_lp, old, adv, 1e-4, 0.04, ref_mean, ref_mean_ref, ref_std_dev_t)

    spec = LossSpec(clip_range=1e-4, kl_beta=0.04, kl_form="flow_grpo")
    per_sample, stats = step_loss(v, x, x_next, old, adv.clamp(-5, 5), t, t_next, noise, spec, v_ref)
    torch.testing.assert_close(per_sample.mean(), expected, **TIGHT)
    torch.testing.assert_close(stats["kl"], expected_kl, **TIGHT)
    # the exact KL divides by the step variance g^2 |dt|: exact = flow_grpo / |dt|
    exact = gaussian_kl(mean, sde_moments(x, v_ref, t, t_next, noise)[0], std, "mean")
    torch.testing.assert_close(exact.mean() * (t - t_next), expected_kl, **TIGHT)
    assert kl_std(std, t, t_next, noise, "exact") is std


@pytest.mark.parametrize("k", [0, 3, 11])
def test_flow_grpo_cps_log_prob_and_kl(k):
    x, v, v_ref, eps = _draw(200 + k)
    t, t_next = GRID[k].item(), GRID[k + 1].item()
    noise = SDENoise("cps", 0.8)
    mean, std = sde_moments(x, v, t, t_next, noise)
    x_next = mean + std * eps
    ref_lp, ref_mean, ref_std_dev_t = _flow_grpo_cps(x, v, t, t_next, 0.8, x_next)
    torch.testing.assert_close(mean, ref_mean, **TIGHT)
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std, "mean", "flow_grpo_cps"), ref_lp, **TIGHT)
    # train_sd3.py's KL with a CPS step: its std_dev_t is the step's full std
    _, ref_mean_ref, _ = _flow_grpo_cps(x, v_ref, t, t_next, 0.8, x_next)
    old = ref_lp - 1e-3
    adv = torch.tensor([1.0, -0.5, 4.0], dtype=torch.float64)
    expected, _ = _flow_grpo_loss(ref_lp, old, adv, 1e-5, 0.01, ref_mean, ref_mean_ref, ref_std_dev_t)
    spec = LossSpec(clip_range=1e-5, kl_beta=0.01, logprob_form="flow_grpo_cps", kl_form="flow_grpo")
    per_sample, _ = step_loss(v, x, x_next, old, adv, t, t_next, noise, spec, v_ref)
    torch.testing.assert_close(per_sample.mean(), expected, **TIGHT)


def test_flow_grpo_global_std_advantages():
    """yifan123/flow_grpo @ 54809b5, flow_grpo/stat_tracking.py (``PerPromptStatTracker.update``,
    global_std=True): per-prompt mean, ``np.std`` of all rewards + 1e-4."""
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=24)
    prompts = np.repeat(np.arange(4), 6)
    expected = np.empty_like(rewards)
    for p in np.unique(prompts):
        group = rewards[prompts == p]
        expected[prompts == p] = (group - np.mean(group)) / (np.std(rewards) + 1e-4)
    ours = group_advantages(torch.from_numpy(rewards), 6, std_mode="global")
    torch.testing.assert_close(ours.advantages, torch.from_numpy(expected), **TIGHT)
    cfg = make_preset("flow-grpo")
    assert (cfg.loss.std_mode, cfg.loss.kl_form, cfg.loss.std_unbiased, cfg.loss.adv_eps) == ("global", "flow_grpo", False, 1e-4)


# ---------------------------------------------------------------- MixGRPO / DanceGRPO
def _mixgrpo_group_advantages(rewards: torch.Tensor, g: int, trimmed_ratio: float) -> torch.Tensor:
    """Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/train_grpo_flux.py (``use_group``,
    ``reward_aggr``): sort, drop the ``min(int(G r), G - 1)`` lowest, torch ``.std()`` + 1e-8."""
    advantages = torch.zeros_like(rewards)
    for i in range(len(rewards) // g):
        group = rewards[i * g:(i + 1) * g]
        if trimmed_ratio > 0:
            ordered = torch.sort(group)[0]
            trim = min(int(len(ordered) * trimmed_ratio), len(ordered) - 1)
            kept = ordered[trim:]
            mean, std = kept.mean(), kept.std() + 1e-8
        else:
            mean, std = group.mean(), group.std() + 1e-8
        advantages[i * g:(i + 1) * g] = (group - mean) / std
    return advantages


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
def test_mixgrpo_trimmed_unbiased_advantages(ratio):
    rewards = torch.randn(36, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = _mixgrpo_group_advantages(rewards, 12, ratio)
    ours = group_advantages(rewards, 12, eps=1e-8, trimmed_ratio=ratio, unbiased=True)
    torch.testing.assert_close(ours.advantages, expected, **TIGHT)
    # one reward: normalize_then_sum is the same normalisation
    multi = multi_reward_advantages({"r": rewards}, {"r": 1.0}, 12, eps=1e-8, trimmed_ratio=ratio, unbiased=True)
    torch.testing.assert_close(multi.advantages, expected, **TIGHT)
    for name in ("mixgrpo", "mixgrpo-cps", "dance-grpo"):
        cfg = make_preset(name)
        assert (cfg.loss.std_unbiased, cfg.loss.adv_eps) == (True, 1e-8), name


def test_dance_grpo_per_sample_subsets():
    """XueZeyue/DanceGRPO @ 15cc71d, fastvideo/train_grpo_flux.py (~l. 551-572): a fresh
    ``torch.randperm(T - 1)`` per sample, the first ``int((T - 1) * 0.6)`` entries trained."""
    cfg = make_preset("dance-grpo")
    assert cfg.schedule.per_sample and cfg.sampler.sde_on == "all"
    sched = WindowSchedule("random_subset", 25, fraction=0.6, per_sample=True, seed=1)
    mask = sched.sample_steps(3, range(64))
    assert mask.shape == (64, 24) and (mask.sum(1) == int(24 * 0.6)).all()
    assert len({tuple(row) for row in mask}) == 64  # every sample its own subset
    # a sample's subset depends on its id only, not on which rank (which ids) asks
    np.testing.assert_array_equal(sched.sample_steps(3, [5, 40]), mask[[5, 40]])
    assert not np.array_equal(sched.sample_steps(4, range(64)), mask)
    # uniform over steps: each step in ~14/24 of 64 * 50 draws
    freq = np.mean([sched.sample_steps(i, range(64)) for i in range(50)], axis=(0, 1))
    assert np.abs(freq - 14 / 24).max() < 0.05
    shared = WindowSchedule("random_subset", 25, fraction=0.6, seed=1).sample_steps(3, range(4))
    assert (shared == shared[0]).all() and shared.sum(1)[0] == 14
    with pytest.raises(ValueError, match="per-sample step subsets need the random_subset schedule"):
        WindowSchedule("progressive", 25, per_sample=True)


def _mixgrpo_sde_dpm_first_order(sample, model_output, sigmas, step_index, noise):
    """Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/utils/sampling_utils.py: ``dpm_step`` with
    ``dpm_state=None`` (as its ``grpo_one_step`` recomputes log-probs) and ``sde_solver=True``:
    ``convert_model_output`` then ``dpm_solver_first_order_update`` for ``dpmsolver++``, then
    the log-prob. Returns (prev_sample, prev_mean, std_dev_t * dt_sqrt, log_prob)."""
    x0 = sample - sigmas[step_index] * model_output  # convert_model_output
    sigma_t, sigma_s = sigmas[step_index + 1], sigmas[step_index]
    alpha_t, sigma_t = 1 - sigma_t, sigma_t  # _sigma_to_alpha_sigma_t
    alpha_s, sigma_s = 1 - sigma_s, sigma_s
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    h = lambda_t - lambda_s
    prev_mean = (sigma_t / sigma_s * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
    std_dev_t = sigma_t
    dt_sqrt = torch.sqrt(1.0 - torch.exp(-2 * h))
    prev_sample = prev_mean + std_dev_t * dt_sqrt * noise
    log_prob = (-((prev_sample - prev_mean) ** 2) / (2 * ((std_dev_t * dt_sqrt) ** 2)) - torch.log(std_dev_t * dt_sqrt)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=torch.float64))))
    return prev_sample, prev_mean, std_dev_t * dt_sqrt, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("k", [0, 1, 6, 15, 23])
def test_mixgrpo_sde_dpm_solver_step_and_log_prob(k):
    """``sampler.sde_kind=dpm``: the same mean, std, sample and log-prob as MixGRPO's
    first-order SDE-DPM-Solver++ step (k = 0 starts at t = 1, where e^{-h} = 0)."""
    x, v, eps, _ = _draw(40 + k)
    t, t_next = GRID[k].item(), GRID[k + 1].item()
    ref_next, ref_mean, ref_std, ref_lp = _mixgrpo_sde_dpm_first_order(x, v, GRID, k, eps)
    mean, std = sde_moments(x, v, t, t_next, SDENoise("dpm", 1.0))
    torch.testing.assert_close(mean, ref_mean, **TIGHT)
    torch.testing.assert_close(std * torch.ones_like(x), ref_std * torch.ones_like(x), **TIGHT)
    torch.testing.assert_close(mean + std * eps, ref_next, **TIGHT)
    torch.testing.assert_close(gaussian_log_prob(ref_next, mean, std, "mean"), ref_lp, **TIGHT)


# ---------------------------------------------------------------- GRPO-Guard, transcribed
def _grpo_guard_loss(old_log_prob, log_prob, advantages, clip_ratio, old_mean, mean, std_dev_t, sqrt_dt, adv_clip=5.0):
    """verl-project/verl-omni @ a1139ba, verl_omni/trainer/diffusion/diffusion_algos.py,
    ``GRPOGuardLoss.compute_loss`` (the authors' code is not public)."""
    advantages = torch.clamp(advantages, -adv_clip, adv_clip)
    scale = sqrt_dt.mean() * std_dev_t.mean()
    mean_diff_sq = (mean - old_mean).pow(2).mean(dim=tuple(range(1, mean.ndim)))
    bias = mean_diff_sq / (2 * scale**2)
    ratio = torch.exp((log_prob - old_log_prob + bias) * scale)
    per_elem = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio))
    return torch.mean(per_elem) / (sqrt_dt.mean() ** 2)


@pytest.mark.parametrize(("k", "clip"), [(0, 2e-6), (5, 0.05), (20, 0.05)])
def test_grpo_guard_loss_and_gradient_match_verl_omni(k, clip):
    """The rollout drew ``x'`` from the old velocity's step; the policy has since moved
    (``v = v_old + 0.01 noise``), so the bias ``b`` and the ratio are both non-trivial."""
    x, v_old, dv, eps = _draw(300 + k)
    t, t_next = GRID[k].item(), GRID[k + 1].item()
    noise = SDENoise("flow_grpo", 0.7)
    mean_old, std = sde_moments(x, v_old, t, t_next, noise)
    x_next = mean_old + std * eps
    old_lp, _, _ = _flow_grpo_sde(x, v_old, t, t_next, GRID[1].item(), 0.7, x_next)
    adv = torch.tensor([-7.0, 0.3, 2.0], dtype=torch.float64)
    v_ours = (v_old + 0.01 * dv).requires_grad_()
    v_theirs = (v_old + 0.01 * dv).requires_grad_()
    spec = LossSpec(clip_range=clip, ratio_norm=True, step_weight="inverse_dt")
    per_sample, _ = step_loss(v_ours, x, x_next, old_lp, adv.clamp(-5, 5), t, t_next, noise, spec, mean_old=mean_old)
    lp, mean, std_dev_t = _flow_grpo_sde(x, v_theirs, t, t_next, GRID[1].item(), 0.7, x_next)
    expected = _grpo_guard_loss(old_lp, lp, adv, clip, mean_old, mean, std_dev_t,
                                torch.full((3,), math.sqrt(t - t_next), dtype=torch.float64))
    torch.testing.assert_close(per_sample.mean(), expected, **TIGHT)
    per_sample.mean().backward()
    expected.backward()
    torch.testing.assert_close(v_ours.grad, v_theirs.grad, rtol=1e-10, atol=1e-14)
    # the re-centred log-ratio is mean(xi (mean_theta - mean_old)): zero on average over xi
    moved, _ = sde_moments(x, v_old + 0.01 * dv, t, t_next, noise)
    log_ratio = ((lp.detach() - old_lp) + ((moved - mean_old) ** 2).mean((1, 2, 3)) / (2 * std.max() ** 2)) * std.max()
    torch.testing.assert_close(log_ratio, (eps * (moved - mean_old)).mean((1, 2, 3)), rtol=1e-9, atol=1e-15)

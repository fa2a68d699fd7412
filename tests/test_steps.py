"""Step functions: log-probs, zero-noise limits, importance ratios, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mixgrpo.core.grids import uniform_grid
from mixgrpo.core.sampler import initial_noise, mixed_plan, sample
from mixgrpo.core.steps import (
    SDENoise,
    euler_step,
    gaussian_log_prob,
    sde_moments,
    sde_step,
    transition_log_prob,
)


class TinyVelocity(torch.nn.Module):
    """A small parametric velocity field ``v(x, t)`` on ``(B, C, H, W)`` images."""

    def __init__(self, channels: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_map = t.view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([x, t_map.to(x.dtype)], dim=1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps", "dpm", "ddim"])
def test_log_prob_equals_torch_normal(kind, reduction):
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    noise = SDENoise(kind, 0.7 if kind != "dance" else 0.3)
    step = sde_step(x, v, 0.8, 0.7, noise, generator=gen)
    ours = gaussian_log_prob(step.x_next, step.mean, step.std, reduction)
    ref = torch.distributions.Normal(step.mean, step.std).log_prob(step.x_next)
    ref = ref.mean(dim=(1, 2, 3)) if reduction == "mean" else ref.sum(dim=(1, 2, 3))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_per_sample_times_match_scalar_times():
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t, t_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    mean, std = sde_moments(x, v, t, t_next, SDENoise("flow_grpo", 0.7))
    for i in range(3):
        m_i, s_i = sde_moments(x[i : i + 1], v[i : i + 1], t[i].item(), t_next[i].item(), SDENoise("flow_grpo", 0.7))
        torch.testing.assert_close(mean[i : i + 1], m_i)
        torch.testing.assert_close(std[i].flatten(), s_i.flatten())


@pytest.mark.parametrize("kind", ["flow_grpo", "dance"])
def test_zero_noise_makes_the_sde_equal_euler(kind):
    """As the noise level a -> 0 the drift correction and the noise vanish: the SDE step
    is the Euler step (difference O(a^2))."""
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    for t, t_next in [(1.0, 0.96), (0.6, 0.5), (0.2, 0.1)]:
        out = sde_step(x, v, t, t_next, SDENoise(kind, 1e-4), generator=gen)
        torch.testing.assert_close(out.x_next, euler_step(x, v, t, t_next), rtol=0, atol=1e-3)
        # and the mean alone (eps = 0) is Euler to O(a^2)
        mean, _ = sde_moments(x, v, t, t_next, SDENoise(kind, 1e-4))
        torch.testing.assert_close(mean, euler_step(x, v, t, t_next), rtol=0, atol=1e-6)


def test_sde_dpm_step_keeps_the_flow_marginals_and_refuses_the_final_step():
    """Given the exact x0, the SDE-DPM-Solver++ step maps the marginal at t to the one at
    t_next: if x = (1 - t) x0 + t eps, then mean + std * z = (1 - t') x0 + t' eps' in law
    (mean coefficient of eps: t' e^{-h}; its variance with the noise's: t'^2)."""
    gen = torch.Generator().manual_seed(6)
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    for t, t_next in [(1.0, 0.9), (0.7, 0.5), (0.3, 0.05)]:
        x = (1 - t) * x0 + t * eps
        v = eps - x0  # the exact velocity
        mean, std = sde_moments(x, v, t, t_next, SDENoise("dpm", 1.0))
        e_h = (1 - t) * t_next / (t * (1 - t_next))
        torch.testing.assert_close(mean, (1 - t_next) * x0 + t_next * e_h * eps, rtol=0, atol=1e-5)
        assert float(std) ** 2 + (t_next * e_h) ** 2 == pytest.approx(t_next**2, rel=1e-5)
    with pytest.raises(ValueError, match="keep the final step deterministic"):
        sde_moments(x, v, 0.1, 0.0, SDENoise("dpm", 1.0))


def test_cps_last_step_is_the_clean_prediction_and_has_no_density():
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    mean, std = sde_moments(x, v, 0.1, 0.0, SDENoise("cps", 0.7))
    torch.testing.assert_close(mean, x - 0.1 * v)
    assert float(std) == 0.0
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_log_prob(mean, mean, std, "mean")


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps", "dpm", "ddim"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_ratio_is_exactly_one_for_unchanged_parameters(kind, reduction):
    model = TinyVelocity()
    grid = uniform_grid(8, shift=3.0)
    noise = SDENoise(kind, 0.7 if kind != "dance" else 0.3)
    x1 = initial_noise(2, 3, (3, 6, 6), shared=True, generator=torch.Generator().manual_seed(4))
    rollout = sample(model, x1, mixed_plan(grid, [0, 2, 5]), noise, reduction=reduction,
                     generator=torch.Generator().manual_seed(5))
    tr = rollout.transitions
    for s in range(len(tr)):
        t = tr.t[s].expand(x1.shape[0])
        new = transition_log_prob(tr.x[s], tr.x_next[s], model(tr.x[s], t), tr.t[s].item(),
                                  tr.t_next[s].item(), noise, reduction)
        assert torch.equal(torch.exp(new - tr.log_prob[s]), torch.ones_like(new))


def test_recomputed_log_prob_changes_when_parameters_change():
    model = TinyVelocity()
    grid = uniform_grid(8, shift=3.0)
    noise = SDENoise("flow_grpo", 0.7)
    x1 = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    tr = sample(model, x1, mixed_plan(grid, [1]), noise, generator=torch.Generator().manual_seed(7)).transitions
    with torch.no_grad():
        model.conv.bias.add_(0.05)
    t = tr.t[0].expand(4)
    new = transition_log_prob(tr.x[0], tr.x_next[0], model(tr.x[0], t), tr.t[0].item(), tr.t_next[0].item(), noise, "mean")
    assert not torch.allclose(new, tr.log_prob[0])
    new.sum().backward()  # differentiable through v
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_shared_initial_noise_within_groups_only():
    z = initial_noise(3, 4, (2, 5), shared=True, generator=torch.Generator().manual_seed(8))
    assert z.shape == (12, 2, 5)
    groups = z.view(3, 4, 2, 5)
    assert torch.equal(groups[:, :1].expand_as(groups), groups)
    assert not torch.equal(groups[0, 0], groups[1, 0])
    independent = initial_noise(3, 4, (2, 5), shared=False, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(independent[0], independent[1])


def test_group_members_diverge_only_through_the_window():
    """With shared noise, group members are identical until the first SDE step."""
    model = TinyVelocity()
    grid = uniform_grid(10, shift=3.0)
    x1 = initial_noise(1, 4, (3, 6, 6), shared=True, generator=torch.Generator().manual_seed(9))
    out = sample(model, x1, mixed_plan(grid, [3, 4]), SDENoise("flow_grpo", 0.7),
                 generator=torch.Generator().manual_seed(10), keep_trajectory=True)
    for k in range(4):  # before step 3 runs
        assert torch.equal(out.trajectory[k][0], out.trajectory[k][3])
    assert not torch.equal(out.trajectory[5][0], out.trajectory[5][3])
    assert out.transitions.x.shape == (2, 4, 3, 6, 6)
    assert out.transitions.log_prob.shape == (2, 4)
    torch.testing.assert_close(out.transitions.t, grid[[3, 4]].float())


def test_bad_inputs_raise_clear_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown SDE kind 'ddpm'"):
        SDENoise("ddpm", 0.5)
    with pytest.raises(ValueError, match="noise level must be a finite number > 0"):
        SDENoise("flow_grpo", 0.0)
    with pytest.raises(ValueError, match=r"cps noise level must be in \(0, 1\]"):
        SDENoise("cps", 1.5)
    with pytest.raises(ValueError, match=r"ddim noise level must be in \(0, 1\]"):
        SDENoise("ddim", 1.5)
    with pytest.raises(ValueError, match="unknown log-prob reduction 'max'"):
        gaussian_log_prob(x, x, 1.0, "max")
    with pytest.raises(ValueError, match="t_next < t"):
        sde_moments(x, x, 0.5, 0.6, SDENoise())
    with pytest.raises(ValueError, match=r"\(B,\) tensor with B=2"):
        euler_step(x, x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="SDENoise must be given"):
        sample(lambda x, t: x, torch.zeros(1, 2), mixed_plan(uniform_grid(4), [0]))


def test_sum_and_mean_reductions_differ_by_the_dimension():
    gen = torch.Generator().manual_seed(12)
    x, m = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    assert torch.allclose(gaussian_log_prob(x, m, 0.5, "sum"), 32 * gaussian_log_prob(x, m, 0.5, "mean"))
    # a unit Gaussian at its mean: -log(sqrt(2 pi)) per element
    zero = gaussian_log_prob(m, m, 1.0, "mean")
    torch.testing.assert_close(zero, torch.full((3,), -0.5 * math.log(2 * math.pi)))

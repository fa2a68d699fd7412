"""VP diffusion (epsilon / v-prediction) on the flow machinery (core/vp.py, sde kind ``ddim``):
our samplers in ``y = x / c`` against diffusers' DDIM and DPM-Solver++ schedulers, and the
DDIM-eta density against DDPO's ``ddim_step_with_logprob``."""

from __future__ import annotations

import math

import pytest
import torch

from mixgrpo.core.sampler import mixed_plan, sample
from mixgrpo.core.steps import SDENoise, gaussian_log_prob, sde_step
from mixgrpo.core.vp import (
    flow_time,
    timestep_from_flow_time,
    velocity_from_prediction,
    vp_coefficients,
    vp_grid,
    vp_timesteps,
)

from test_steps import TinyVelocity

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _ddim(prediction_type: str, spacing: str, offset: int, alpha_one: bool):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                         set_alpha_to_one=alpha_one, clip_sample=False)


def _as_flow(model, alphas_cumprod, prediction_type):
    """The VP model ``out = model(x, timestep / 1000)`` as a flow velocity in ``(y, tau)``."""
    def velocity(y, tau):
        _, _, c = vp_coefficients(tau.view(-1, 1, 1, 1))
        step = timestep_from_flow_time(tau, alphas_cumprod)
        return velocity_from_prediction(y, tau, model((c * y).float(), (step / 1000).float()), prediction_type)
    return velocity


@pytest.mark.parametrize(("spacing", "offset"), [("leading", 1), ("leading", 0), ("trailing", 0)])
def test_timesteps_are_ddims(spacing, offset):
    for steps in (10, 25, 50, 12) if spacing == "leading" else (10, 25, 50):
        scheduler = _ddim("epsilon", spacing, offset, False)
        scheduler.set_timesteps(steps)
        assert vp_timesteps(1000, steps, spacing, offset) == scheduler.timesteps.tolist()
    with pytest.raises(ValueError, match="use one of leading, trailing"):
        vp_timesteps(1000, 10, "linspace")
    with pytest.raises(ValueError, match="use a step count dividing 1000"):
        vp_timesteps(1000, 12, "trailing")


def test_flow_time_maps_back_to_its_timestep():
    ab = _ddim("epsilon", "leading", 1, False).alphas_cumprod
    tau = flow_time(ab)
    assert bool((tau[1:] > tau[:-1]).all()) and 0 < tau[0] < tau[-1] < 1
    back = timestep_from_flow_time(tau[[0, 1, 500, 981, 999]], ab)
    torch.testing.assert_close(back, torch.tensor([0.0, 1, 500, 981, 999], dtype=torch.float64), rtol=0, atol=1e-9)
    a, s, c = vp_coefficients(tau)
    torch.testing.assert_close(a**2, ab.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a * c ** -1 + s * c ** -1, torch.ones_like(a), rtol=1e-12, atol=1e-12)


def euler_vs_ddim(prediction_type: str, spacing: str, offset: int, alpha_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') final samples: our Euler sampler on the VP grid in ``y = x / c`` and
    ``DDIMScheduler`` (eta 0) from the same ``x_T``."""
    model = TinyVelocity(seed=4)
    scheduler = _ddim(prediction_type, spacing, offset, alpha_one)
    scheduler.set_timesteps(12 if spacing == "leading" else 10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = x.clone()
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = model(theirs, torch.full((2,), float(t) / 1000))
        theirs = scheduler.step(out, t, theirs, eta=0.0, return_dict=False)[0]
    ab = scheduler.alphas_cumprod
    grid = vp_grid(ab, scheduler.timesteps.tolist(), float(scheduler.final_alpha_cumprod))
    _, _, c0 = vp_coefficients(grid[0])
    _, _, c_end = vp_coefficients(grid[-1])
    with torch.no_grad():
        y = sample(_as_flow(model, ab, prediction_type), x.double() / c0, mixed_plan(grid, [], "euler")).x0
    return (c_end * y).float(), theirs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("spacing", "offset", "alpha_one"), [("leading", 1, False), ("trailing", 0, True)])
def test_euler_on_the_flow_path_is_ddim(prediction_type, spacing, offset, alpha_one):
    """Euler on ``y`` ends where DDIM (eta 0) ends, for either prediction type and final alphabar."""
    ours, theirs = euler_vs_ddim(prediction_type, spacing, offset, alpha_one)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)  # float32 rounding: up to rel 2.8e-7


def dpm_vs_diffusers(prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') final samples: our ``dpm2`` on the VP grid and
    ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, trailing, final sigma 0)."""
    from diffusers import DPMSolverMultistepScheduler

    model = TinyVelocity(seed=5)
    scheduler = DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type, solver_order=2,
                                            algorithm_type="dpmsolver++", timestep_spacing="trailing",
                                            final_sigmas_type="zero")
    scheduler.set_timesteps(15)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = x.clone()
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = model(theirs, torch.full((2,), float(t) / 1000))
        theirs = scheduler.step(out, t, theirs, return_dict=False)[0]
    ab = scheduler.alphas_cumprod
    grid = vp_grid(ab, scheduler.timesteps.tolist(), 1.0)
    _, _, c0 = vp_coefficients(grid[0])
    with torch.no_grad():
        y = sample(_as_flow(model, ab, prediction_type), x.double() / c0, mixed_plan(grid, [], "dpm2")).x0
    return y.float(), theirs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_on_the_flow_path_is_diffusers_dpm_solver(prediction_type):
    ours, theirs = dpm_vs_diffusers(prediction_type)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)  # float32 rounding: 3.8e-5 at rel 4.5e-7


def _ddpo_ddim_step_with_logprob(alphas_cumprod, final_alpha_cumprod, model_output, timestep, prev_timestep, sample_,
                                 eta, prev_sample=None, variance_noise=None):
    """XueZeyue/DanceGRPO @ 15cc71d, fastvideo/models/stable_diffusion/ddim_with_logprob.py
    (DDPO's ``ddim_step_with_logprob``, epsilon prediction, no clipping): returns
    (prev_sample, log_prob)."""
    alpha_prod_t = alphas_cumprod[timestep]
    alpha_prod_t_prev = alphas_cumprod[prev_timestep] if prev_timestep >= 0 else final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample_ - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_epsilon = model_output
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)  # _get_variance
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        prev_sample = prev_sample_mean + std_dev_t * variance_noise
    log_prob = (-((prev_sample - prev_sample_mean) ** 2) / (2 * (std_dev_t**2)) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=torch.float64))))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddim_eta_vs_ddpo(eta: float, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ours, theirs) of one DDIM-eta step at grid ``index`` (10 leading steps), from the same
    ``x``, model output and noise: the sample and log-density against DDPO's transcription, the
    sample against ``DDIMScheduler.step`` (float32)."""
    scheduler = _ddim("epsilon", "leading", 1, False)
    scheduler.set_timesteps(10)
    ab = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)
    ts = scheduler.timesteps.tolist()
    grid = vp_grid(ab, ts, final)
    gen = torch.Generator().manual_seed(index)
    x, eps_out, z = (torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    t, prev = ts[index], ts[index] - 1000 // 10
    ref_x, ref_lp = _ddpo_ddim_step_with_logprob(ab, final, eps_out, t, prev, x, eta, variance_noise=z)
    tau, tau_n = grid[index].item(), grid[index + 1].item()
    _, _, c = vp_coefficients(tau)
    _, _, c_n = vp_coefficients(tau_n)
    v = velocity_from_prediction(x / c, tau, eps_out, "epsilon")
    step = sde_step(x / c, v, tau, tau_n, SDENoise("ddim", eta), eps=z)
    ours_lp = gaussian_log_prob(step.x_next, step.mean, step.std, "mean")
    theirs = scheduler.step(eps_out.float(), t, x.float(), eta=eta, variance_noise=z.float(), return_dict=False)[0]
    return {"ddpo sample": (c_n * step.x_next, ref_x), "ddpo log-prob": (ours_lp - math.log(c_n), ref_lp),
            "diffusers sample": ((c_n * step.x_next).float(), theirs)}


@pytest.mark.parametrize("eta", [1.0, 0.3])
@pytest.mark.parametrize("index", [0, 4, 9])
def test_ddim_eta_step_and_density_are_ddpos(eta, index):
    """The ``ddim`` SDE kind draws DDPO's DDIM-eta sample (same standard noise, x = c y) and
    its log-density in ``y`` is DDPO's in ``x`` plus ``log c'`` per dimension (the Jacobian of
    ``x = c' y``), so ratios are equal; diffusers' ``DDIMScheduler.step`` agrees too."""
    pairs = ddim_eta_vs_ddpo(eta, index)
    torch.testing.assert_close(*pairs["ddpo sample"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(*pairs["ddpo log-prob"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(*pairs["diffusers sample"], rtol=0, atol=2e-5)

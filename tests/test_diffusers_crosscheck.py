"""Our ODE steps against diffusers' schedulers on the same sigma grid."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from mixgrpo.core.grids import uniform_grid  # noqa: E402
from mixgrpo.core.sampler import mixed_plan, sample  # noqa: E402

from test_steps import TinyVelocity  # noqa: E402


def _run_diffusers(scheduler, model, x, sigmas: torch.Tensor) -> torch.Tensor:
    """Drive a diffusers scheduler over an explicit sigma grid (``sigmas`` ends at 0)."""
    n = sigmas.numel() - 1
    scheduler.set_timesteps(n)
    scheduler.sigmas = sigmas.to(torch.float32)
    scheduler.timesteps = sigmas[:-1].to(torch.float32) * scheduler.config.num_train_timesteps
    scheduler._step_index = 0
    for k in range(n):
        t = torch.full((x.shape[0],), sigmas[k].item())
        with torch.no_grad():
            v = model(x, t)
        x = scheduler.step(v, scheduler.timesteps[k], x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("num_steps,shift", [(25, 3.0), (10, 1.0), (7, 3.0)])
def test_euler_matches_flow_match_euler_discrete(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = TinyVelocity(seed=1)
    grid = uniform_grid(num_steps, shift=shift)
    x1 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(model, x1, mixed_plan(grid, [], "euler")).x0
    theirs = _run_diffusers(FlowMatchEulerDiscreteScheduler(shift=1.0), model, x1, grid.float())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_steps,shift", [(25, 3.0), (10, 1.0), (7, 3.0)])
def test_dpm_solver_2m_matches_diffusers(num_steps, shift):
    """Same sigma grid (starting just below 1, as diffusers' flow-sigma grid does), same
    warm-up (first step first order) and final step (first order to sigma = 0)."""
    from diffusers import DPMSolverMultistepScheduler

    model = TinyVelocity(seed=2)
    grid = uniform_grid(num_steps, shift=shift, t_start=0.999)
    x1 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample(model, x1, mixed_plan(grid, [], "dpm2")).x0
    scheduler = DPMSolverMultistepScheduler(
        solver_order=2,
        algorithm_type="dpmsolver++",
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=shift,
        final_sigmas_type="zero",
    )
    theirs = _run_diffusers(scheduler, model, x1, grid.float())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_dpm_solver_2m_matches_diffusers_on_its_own_grid():
    """Also on the grid diffusers builds itself (``set_timesteps`` with ``flow_shift``)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        solver_order=2, algorithm_type="dpmsolver++", use_flow_sigmas=True,
        prediction_type="flow_prediction", flow_shift=3.0,
    )
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas.clone()
    model = TinyVelocity(seed=3)
    x1 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = sample(model, x1, mixed_plan(sigmas.double(), [], "dpm2")).x0
    theirs = _run_diffusers(scheduler, model, x1, sigmas)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_sde_dpm_step_matches_diffusers_sde_dpmsolver_pp(k):
    """``sde_kind=dpm`` is diffusers' first-order ``sde-dpmsolver++`` step on flow sigmas,
    given the same noise (``variance_noise``)."""
    from diffusers import DPMSolverMultistepScheduler

    from mixgrpo.core.steps import SDENoise, sde_step

    scheduler = DPMSolverMultistepScheduler(solver_order=1, algorithm_type="sde-dpmsolver++", use_flow_sigmas=True,
                                            prediction_type="flow_prediction", flow_shift=3.0)
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas.clone()
    gen = torch.Generator().manual_seed(k)
    x, v, noise = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3))
    scheduler._step_index = k
    theirs = scheduler.step(v, scheduler.timesteps[k], x, variance_noise=noise, return_dict=False)[0]
    ours = sde_step(x, v, sigmas[k].item(), sigmas[k + 1].item(), SDENoise("dpm", 1.0), eps=noise).x_next
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

"""Pure tensor math shared by every method: no I/O, no model classes.

The model enters only as a ``velocity(x, t) -> v`` callable.
"""

from .accounting import ModelPasses, count_model_passes
from .dpm_solver import dpm_solver_pp_step, half_log_snr
from .grids import (
    compressed_tail_grid,
    interpolated_tail_grid,
    time_shift,
    uniform_grid,
    validate_grid,
)
from .grpo import (
    Advantages,
    group_advantages,
    multi_reward_advantages,
    ppo_clip_loss,
    ppo_clip_terms,
)
from .objective import KL_FORMS, LossSpec, gaussian_kl, kl_std, step_loss
from .ovf import max_variance_subset
from .sampler import (
    ODE_SOLVERS,
    Rollout,
    SamplingPlan,
    Transitions,
    flash_plan,
    initial_noise,
    mixed_plan,
    sample,
)
from .steps import (
    SDENoise,
    euler_step,
    gaussian_log_prob,
    sde_moments,
    sde_step,
    transition_log_prob,
    x0_from_velocity,
)
from .windows import WINDOW_SCHEDULES, WindowSchedule, make_window_schedule

__all__ = [
    "KL_FORMS",
    "ODE_SOLVERS",
    "WINDOW_SCHEDULES",
    "Advantages",
    "LossSpec",
    "ModelPasses",
    "Rollout",
    "SDENoise",
    "SamplingPlan",
    "Transitions",
    "WindowSchedule",
    "compressed_tail_grid",
    "count_model_passes",
    "dpm_solver_pp_step",
    "euler_step",
    "flash_plan",
    "gaussian_kl",
    "gaussian_log_prob",
    "group_advantages",
    "half_log_snr",
    "initial_noise",
    "interpolated_tail_grid",
    "kl_std",
    "make_window_schedule",
    "max_variance_subset",
    "mixed_plan",
    "multi_reward_advantages",
    "ppo_clip_loss",
    "ppo_clip_terms",
    "sample",
    "sde_moments",
    "sde_step",
    "step_loss",
    "time_shift",
    "transition_log_prob",
    "uniform_grid",
    "validate_grid",
    "x0_from_velocity",
]

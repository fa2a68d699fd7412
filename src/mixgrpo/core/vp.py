"""VP diffusion models (epsilon- or v-prediction: SD1.x/2.x, SDXL) on the flow machinery.

A variance-preserving model noises ``x = a x0 + s eps`` with ``a = sqrt(alphabar)``,
``s = sqrt(1 - alphabar)``. Dividing by ``c = a + s`` gives the flow path

    y = x / c = (1 - tau) x0 + tau eps,        tau = s / (a + s),

so every sampler, window and loss of ours applies unchanged in ``(y, tau)``, with the
model's prediction turned into the flow velocity ``v = eps_hat - x0_hat``
(:func:`velocity_from_prediction`). Exactly, not approximately:

- Euler on ``y`` *is* DDIM with eta = 0: both keep ``(x0_hat, eps_hat)`` and re-noise them to
  the next time, ``y' = (1 - tau') x0_hat + tau' eps_hat``, i.e. ``x' = a' x0_hat + s' eps_hat``.
- DPM-Solver++ is the same update: its half log-SNR ``lambda = log(a / s) = log((1 - tau) / tau)``
  and its data predictions do not change with the coordinates.
- DDIM with eta > 0 (DDPO's ``ddim_step_with_logprob``) is the SDE kind ``ddim`` of
  :mod:`.steps`; its density in ``y`` is DDPO's in ``x`` up to the constant Jacobian
  ``log c'`` per dimension, so importance ratios are the same.

Inverses on the VP curve ``a^2 + s^2 = 1``: ``c = 1 / sqrt((1 - tau)^2 + tau^2)``,
``a = (1 - tau) c``, ``s = tau c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "VPSchedule",
    "flow_time",
    "scaled_linear_alphas_cumprod",
    "timestep_from_flow_time",
    "velocity_from_prediction",
    "vp_coefficients",
    "vp_grid",
    "vp_timesteps",
]

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
# DDIM steps from t to t - num_train // steps; only these spacings land that on the next listed
# timestep (with "linspace" diffusers' DDIM evaluates the model off the noise level it stepped to)
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing")


def flow_time(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``tau = s / (a + s)`` of each ``alphabar`` (float64)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return s / (a + s)


def vp_coefficients(tau: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, s, c)`` of flow time(s) ``tau`` (a Python float gives float64): ``x = a x0 + s eps = c y``."""
    tau = tau if torch.is_tensor(tau) else torch.tensor(tau, dtype=torch.float64)
    c = torch.rsqrt((1 - tau) ** 2 + tau**2)
    return (1 - tau) * c, tau * c, c


def vp_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> list[int]:
    """The discrete timesteps diffusers' ``DDIMScheduler.set_timesteps`` picks (noisiest first)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if spacing == "trailing" and num_train_timesteps % steps:
        raise ValueError(f"trailing spacing with {steps} steps is not one DDIM chain (DDIM steps by "
                         f"{num_train_timesteps // steps}, the timesteps by {num_train_timesteps / steps:.2f}): "
                         f"use a step count dividing {num_train_timesteps}, or leading spacing")
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        ts = [i * ratio + steps_offset for i in range(steps)][::-1]
    elif spacing == "trailing":
        ratio = num_train_timesteps / steps
        ts = [round(num_train_timesteps - i * ratio) - 1 for i in range(steps)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of {', '.join(TIMESTEP_SPACINGS)}")
    return [int(t) for t in ts]


def vp_grid(alphas_cumprod: torch.Tensor, timesteps: list[int], final_alpha_cumprod: float = 1.0) -> torch.Tensor:
    """``(len(timesteps) + 1,)`` float64 flow-time grid of a DDIM timestep list; the last entry
    is ``final_alpha_cumprod``'s time (0 when it is 1, diffusers' ``set_alpha_to_one``)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    ends = torch.cat([ab[torch.as_tensor(timesteps)], torch.tensor([final_alpha_cumprod], dtype=torch.float64)])
    grid = flow_time(ends)
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing in noise (noisiest first)")
    return grid


def timestep_from_flow_time(tau: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep whose ``alphabar`` has flow time ``tau``, linear in
    between the table's entries: grid times give their integer timestep back; times between
    them (a compressed Flash grid, forward-process loss times) land in between."""
    table = flow_time(alphas_cumprod)  # increasing with the timestep
    tau = torch.as_tensor(tau, dtype=torch.float64)
    hi = torch.searchsorted(table, tau.clamp(table[0], table[-1])).clamp(1, len(table) - 1)
    lo = hi - 1
    frac = (tau.clamp(table[0], table[-1]) - table[lo]) / (table[hi] - table[lo])
    return lo.to(torch.float64) + frac


def velocity_from_prediction(y: torch.Tensor, tau: torch.Tensor | float, output: torch.Tensor,
                             prediction_type: str) -> torch.Tensor:
    """Flow velocity ``v = eps_hat - x0_hat`` at ``(y, tau)`` from a VP model's output at
    ``x = c y``: epsilon (``x0_hat = (x - s eps_hat) / a``) or v-prediction
    (``x0_hat = a x - s v``, ``eps_hat = s x + a v``). ``tau``: scalar or ``(B,)``."""
    tau = torch.as_tensor(tau, dtype=torch.promote_types(y.dtype, torch.float32), device=y.device)
    if tau.ndim == 1:
        tau = tau.view(-1, *([1] * (y.ndim - 1)))
    a, s, c = vp_coefficients(tau)
    x, out = c * y, output.to(tau.dtype)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - s * eps) / a
    elif prediction_type == "v_prediction":
        x0, eps = a * x - s * out, s * x + a * out
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    return eps - x0


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """``(N,)`` float64 of the float32 ``alphas_cumprod`` of Stable Diffusion's "scaled_linear"
    betas (``beta_k = linspace(sqrt(beta_start), sqrt(beta_end), N)_k ** 2``), computed as diffusers'
    schedulers compute it (float32), so the two tables are equal."""
    if num_train_timesteps < 2 or not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1, got {num_train_timesteps}, "
                         f"{beta_start}, {beta_end}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).double()


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """What sampling needs of a VP scheduler: ``alphas_cumprod`` ``(N,)`` (float64 of the
    scheduler's float32 table), the prediction type and how DDIM picks its timesteps."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    spacing: str = "leading"
    steps_offset: int = 0
    final_alpha_cumprod: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; use a model predicting "
                             f"{' or '.join(PREDICTION_TYPES)}")
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {self.spacing!r} is not supported; use {' or '.join(TIMESTEP_SPACINGS)}")
        object.__setattr__(self, "alphas_cumprod", torch.as_tensor(self.alphas_cumprod, dtype=torch.float64))
        # (N,) float64 flow time of each training timestep, increasing with it
        object.__setattr__(self, "flow_times", flow_time(self.alphas_cumprod))

    @property
    def end_time(self) -> float:
        """The flow time every grid ends at: the final alpha's."""
        return float(flow_time(torch.tensor([self.final_alpha_cumprod]))[0])

    def grid(self, num_steps: int) -> torch.Tensor:
        """``(num_steps + 1,)`` float64 flow times of DDIM's ``num_steps`` timesteps (noisiest first)."""
        steps = vp_timesteps(len(self.alphas_cumprod), num_steps, self.spacing, self.steps_offset)
        return vp_grid(self.alphas_cumprod, steps, self.final_alpha_cumprod)

    def timesteps(self, tau: torch.Tensor) -> torch.Tensor:
        """float32 (fractional) training timesteps of flow times ``tau`` ``(B,)``; a time equal
        to a table entry at ``tau``'s precision gives that entry's integer timestep back."""
        table = self.flow_times.to(tau.device)
        steps = timestep_from_flow_time(tau.double(), self.alphas_cumprod.to(tau.device))
        nearest = steps.round().clamp(0, len(table) - 1)
        on_table = table[nearest.long()].to(tau.dtype) == tau
        return torch.where(on_table, nearest, steps).float()

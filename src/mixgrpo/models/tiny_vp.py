"""The embedded U-Net as a VP diffusion model (epsilon- or v-prediction): ``tiny-vp-unet``.

It is what ``mixgrpo pretrain --parameterization eps`` (or ``v``) trains: the same world,
verifier and network as the flow base (:mod:`.tiny_unet`), but a DDPM model

    x_k = a_k x0 + s_k eps,   a_k^2 = alphabar_k,  s_k^2 = 1 - alphabar_k,   k = 0 .. N-1

on Stable Diffusion's "scaled_linear" betas (N = 1000, 0.00085 .. 0.012), trained on
``|| eps_theta(x_k, k) - eps ||^2`` (or on ``v = a eps - s x0``) with ``k`` uniform, and
sampled as SD is: DDIM timesteps with "leading" spacing and ``steps_offset`` 1, from
``x_T ~ N(0, I)``, ending at ``alphabar = 1``.

Samplers, windows and losses see it as every VP model, through :mod:`mixgrpo.core.vp`:
``forward(y, tau, cond)`` is the flow velocity at ``y = x / (a + s)``, flow time
``tau = s / (a + s)`` (:func:`~mixgrpo.core.vp.velocity_from_prediction`), and
``time_grid`` / ``initial_noise_scale`` are the hooks the SD adapter has
(:mod:`mixgrpo.inference.generate`). The grid ends at ``tau = 0`` (``set_alpha_to_one``), so
the last sample is the image: no ``final_latents``.

Preconditioning (a choice of how the network reads its input, not of what it predicts): the
network sees ``x_k / (a_k + s_k)`` (the flow path's ``y``) and the flow time ``tau_k``, the
inputs of the flow base, so ``--init base`` starts from the flow base's features and only
the output has to change meaning. ``prediction(x, k, cond)`` is still ``eps_theta(x_k, k)``
(or ``v_theta``) of the raw ``x_k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.vp import (
    PREDICTION_TYPES,
    VPSchedule,
    scaled_linear_alphas_cumprod,
    velocity_from_prediction,
    vp_coefficients,
)
from .tiny_dit import TextCondition
from .tiny_unet import TinyUNet, TinyUNetConfig

__all__ = ["TinyVPUNet", "TinyVPUNetConfig"]


@dataclass(frozen=True)
class TinyVPUNetConfig(TinyUNetConfig):
    """The tiny U-Net's fields plus its VP schedule (SD1.5's by default)."""

    prediction_type: str = "epsilon"  # epsilon | v_prediction
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1  # DDIM "leading" spacing, as SD1.5's scheduler config

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        scaled_linear_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end)  # validates
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset must be in [0, {self.num_train_timesteps}), got {self.steps_offset}")


class TinyVPUNet(TinyUNet):
    """``eps_theta(x_k, k, text)`` (or ``v_theta``) on ``(B, C, H, W)`` images in ``[-1, 1]``,
    sampled and trained as a flow velocity in ``(y, tau)``."""

    config: TinyVPUNetConfig

    def __init__(self, config: TinyVPUNetConfig | None = None):
        super().__init__(config or TinyVPUNetConfig())
        cfg = self.config
        self.schedule = VPSchedule(scaled_linear_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end),
                                   cfg.prediction_type, "leading", cfg.steps_offset, final_alpha_cumprod=1.0)

    def prediction(self, x: torch.Tensor, k: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The model's own output at ``x_k`` ``(B, C, H, W)`` and integer timesteps ``k`` ``(B,)``."""
        tau = self.schedule.flow_times.to(x.device)[k.long()]  # (B,) float64
        return self._network(x, tau, cond)

    def forward(self, y: torch.Tensor, tau: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The flow velocity ``v = eps_hat - x0_hat`` at ``(y, tau)``, ``tau`` ``(B,)``."""
        out = TinyUNet.forward(self, y, tau.to(y.dtype), cond)  # the network's input x / c(tau) is y itself
        return velocity_from_prediction(y, tau, out, self.config.prediction_type).to(y.dtype)

    def _network(self, x: torch.Tensor, tau: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The U-Net on the preconditioned input ``x / c(tau)`` at time ``tau`` (module doc)."""
        c = vp_coefficients(tau.to(torch.promote_types(x.dtype, torch.float32)))[2].view(-1, *([1] * (x.ndim - 1)))
        return super().forward((x / c).to(x.dtype), tau.to(x.dtype), cond)

    # the samplers' hooks (mixgrpo.inference.generate), as the SD adapter's
    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The flow times of DDIM's ``num_steps`` leading timesteps, ending at 0."""
        return self.schedule.grid(num_steps)

    def initial_noise_scale(self, grid: torch.Tensor) -> float:
        """``1 / c(tau_0)``: DDIM's ``x_T ~ N(0, I)`` as a sample ``y_0`` of the flow path."""
        return float(1.0 / vp_coefficients(float(grid[0]))[2])

"""The GRPO loss of one trained step, as a pure function: velocities in, per-sample loss out.

The trainer evaluates the policy (and, with a KL term, the reference policy) on a stored
transition ``(x, x_next, t, t_next)`` and hands the velocities here; it only weights and
accumulates what comes back. Each reference's conventions are options:

- ``logprob_form``: ``"gaussian"`` (the exact density, ours) or ``"flow_grpo_cps"``
  (Flow-GRPO's ``cps`` surrogate ``-(x' - mean)^2``, see
  :func:`~mixgrpo.core.steps.gaussian_log_prob`).
- ``kl_form``: ``"exact"``, the KL between the two step Gaussians,
  ``||mean - mean_ref||^2 / (2 std^2)`` with ``std^2 = g^2 |dt|`` the step variance; or
  ``"flow_grpo"``, as yifan123/flow_grpo @ 54809b5 ``scripts/train_sd3.py`` computes it:
  ``mean((mean - mean_ref)^2) / (2 std_dev_t^2)`` where ``std_dev_t`` is what its step
  function returns: ``g(t)`` for the SDE step (no ``sqrt|dt|``: exact KL x |dt|), the full
  std for a CPS step. Its beta (0.04) is tuned to that scale.
- ``ratio_norm`` (GRPO-Guard, arXiv 2510.22319, as verl-project/verl-omni @ a1139ba
  ``verl_omni/trainer/diffusion/diffusion_algos.py::GRPOGuardLoss`` and its
  ``docs/algo/grpo_guard.md``): with the step std ``sigma_s = g(t) sqrt|dt|`` and the
  rollout's step mean ``mean_old``::

      b     = mean (mean_theta - mean_old)^2 / (2 sigma_s^2)
      rho~  = exp(sigma_s (log p_theta - log p_old + b))

  With ``x' = mean_old + sigma_s xi`` this is ``exp(mean(xi (mean_theta - mean_old)))``:
  centred on 1 whatever the step, where the plain ratio's log has mean ``-b < 0``.
- ``step_weight = "inverse_dt"``: GRPO-Guard's per-step reweighting, each step's loss
  divided by ``|dt|`` so that every step's gradient has the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .grpo import ppo_clip_terms
from .steps import (
    LOG_PROB_FORMS,
    LOG_PROB_REDUCTIONS,
    LogProbForm,
    Reduction,
    SDENoise,
    Time,
    broadcast_std,
    gaussian_log_prob,
    sde_moments,
    upcast,
)

__all__ = ["KL_FORMS", "STEP_WEIGHTS", "LossSpec", "gaussian_kl", "kl_std", "step_loss"]

KLForm = Literal["exact", "flow_grpo"]
KL_FORMS: tuple[str, ...] = ("exact", "flow_grpo")
StepWeight = Literal["none", "inverse_dt"]
STEP_WEIGHTS: tuple[str, ...] = ("none", "inverse_dt")


@dataclass(frozen=True)
class LossSpec:
    """How one trained step is scored (see the module docstring for the forms)."""

    clip_range: float  # PPO clip eps
    kl_beta: float = 0.0  # weight of the KL to the reference policy; 0 = no reference passes
    reduction: Reduction = "mean"  # log-prob / KL reduction over latent dims
    logprob_form: LogProbForm = "gaussian"  # gaussian | flow_grpo_cps
    kl_form: KLForm = "exact"  # exact | flow_grpo
    ratio_norm: bool = False  # GRPO-Guard's re-centred ratio (needs the rollout's step means)
    step_weight: StepWeight = "none"  # none | inverse_dt (GRPO-Guard)

    def __post_init__(self) -> None:
        if self.step_weight not in STEP_WEIGHTS:
            raise ValueError(f"unknown step weight {self.step_weight!r}; choose one of {STEP_WEIGHTS}")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.reduction not in LOG_PROB_REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; choose one of {LOG_PROB_REDUCTIONS}")
        if self.logprob_form not in LOG_PROB_FORMS:
            raise ValueError(f"unknown log-prob form {self.logprob_form!r}; choose one of {LOG_PROB_FORMS}")
        if self.kl_form not in KL_FORMS:
            raise ValueError(f"unknown KL form {self.kl_form!r}; choose one of {KL_FORMS}")


def gaussian_kl(
    mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float, reduction: Reduction
) -> torch.Tensor:
    """``||mean - mean_ref||^2 / (2 std^2)`` per element, reduced over non-batch dims like the
    log-prob (``"mean"`` or ``"sum"``): the KL between two Gaussians of the same ``std`` when
    ``std`` is the step's std. Returns ``(B,)``."""
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {LOG_PROB_REDUCTIONS}")
    std = broadcast_std(std, mean)
    kl = (upcast(mean) - upcast(mean_ref)) ** 2 / (2 * std**2)
    dims = tuple(range(1, kl.ndim))
    return kl.mean(dim=dims) if reduction == "mean" else kl.sum(dim=dims)


def kl_std(std: torch.Tensor | float, t: Time, t_next: Time, noise: SDENoise, form: KLForm) -> torch.Tensor | float:
    """The std the KL divides by: the step's own std (``exact``), or Flow-GRPO's
    ``std_dev_t``: ``std / sqrt(t - t_next) = g(t)`` for the SDE forms, ``std`` for CPS."""
    if form not in KL_FORMS:
        raise ValueError(f"unknown KL form {form!r}; choose one of {KL_FORMS}")
    if form == "exact" or noise.kind == "cps":
        return std
    dt = torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(t_next, dtype=torch.float64)
    std = torch.as_tensor(std)
    dt = dt.to(std.dtype).view(-1, *([1] * (std.ndim - 1))) if dt.ndim and std.ndim else dt.to(std.dtype)
    return std / torch.sqrt(dt)


def step_loss(
    v: torch.Tensor,
    x: torch.Tensor,
    x_next: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    t: Time,
    t_next: Time,
    noise: SDENoise,
    spec: LossSpec,
    v_ref: torch.Tensor | None = None,
    mean_old: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of one trained step for ``B`` samples:

        L_i = max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) + beta KL_i,
        rho_i = exp(log p_theta(x_next_i | x_i) - old_log_prob_i)

    Args:
        v: ``(B, ...)`` the policy's velocity at ``(x, t)`` (differentiable).
        x, x_next: the stored transition; ``old_log_prob`` ``(B,)`` from the rollout.
        advantages: ``(B,)``.
        t, t_next: the step's times (floats or ``(B,)``).
        noise: the SDE form the rollout sampled with.
        spec: clip range, KL weight and the conventions.
        v_ref: the reference policy's velocity (needed when ``spec.kl_beta > 0``).
        mean_old: ``(B, ...)`` the rollout's step mean (needed with ``spec.ratio_norm``).

    Returns:
        ``(B,)`` per-sample losses and detached stats: ``ratio_mean``, ``clip_frac``,
        ``approx_kl`` and ``kl`` (means over the batch).
    """
    mean, std = sde_moments(x, v, t, t_next, noise)
    log_prob = gaussian_log_prob(x_next, mean, std, spec.reduction, spec.logprob_form)
    if spec.ratio_norm:
        if mean_old is None:
            raise ValueError("ratio_norm (GRPO-Guard) needs the rollout's step means mean_old")
        std_b = broadcast_std(std, mean)
        bias = gaussian_kl(mean, mean_old, std_b, spec.reduction)  # b = mean (dmu)^2 / (2 sigma_s^2)
        scale = std_b.reshape(std_b.shape[0], -1)[:, 0] if std_b.ndim else std_b  # sigma_s per sample
        log_ratio = scale * (log_prob - old_log_prob.detach() + bias)
        loss, stats = ppo_clip_terms(log_ratio, torch.zeros_like(log_ratio), advantages, spec.clip_range)
    else:
        loss, stats = ppo_clip_terms(log_prob, old_log_prob, advantages, spec.clip_range)
    if spec.step_weight == "inverse_dt":
        dt = torch.as_tensor(t, dtype=loss.dtype) - torch.as_tensor(t_next, dtype=loss.dtype)
        loss = loss / dt.to(loss.device)
    stats["kl"] = torch.zeros((), dtype=loss.dtype)
    if spec.kl_beta > 0:
        if v_ref is None:
            raise ValueError("kl_beta > 0 needs the reference policy's velocity v_ref")
        with torch.no_grad():
            mean_ref, _ = sde_moments(x, v_ref, t, t_next, noise)
        kl = gaussian_kl(mean, mean_ref, kl_std(std, t, t_next, noise, spec.kl_form), spec.reduction)
        loss = loss + spec.kl_beta * kl
        stats["kl"] = kl.detach().mean()
    return loss, stats

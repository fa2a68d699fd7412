"""Single sampler steps for flow-matching models: the deterministic Euler ODE step and the
stochastic (SDE) steps whose Gaussian transition density is GRPO's policy.

Every function is pure: tensors in, tensors out. ``t`` and ``t_next`` may be Python floats
(one time for the whole batch) or ``(B,)`` tensors (one time per sample). Arithmetic runs in
float32 whatever the model's dtype, as diffusers schedulers do.

Flow conventions: ``x_t = (1 - t) x0 + t eps``, velocity ``v = eps - x0``, so
``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "LOG_PROB_FORMS",
    "LOG_PROB_REDUCTIONS",
    "SDE_KINDS",
    "SDENoise",
    "SDETransition",
    "broadcast_std",
    "euler_step",
    "gaussian_log_prob",
    "sde_moments",
    "sde_step",
    "standard_noise",
    "transition_log_prob",
    "upcast",
    "x0_from_velocity",
]

SDEKind = Literal["flow_grpo", "dance", "cps", "dpm", "ddim"]
SDE_KINDS: tuple[str, ...] = ("flow_grpo", "dance", "cps", "dpm", "ddim")
Reduction = Literal["mean", "sum"]
LOG_PROB_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
LogProbForm = Literal["gaussian", "flow_grpo_cps"]
# gaussian: the exact log-density; flow_grpo_cps: Flow-GRPO's CPS surrogate -(x' - mean)^2, no 1/(2 std^2), no constants
LOG_PROB_FORMS: tuple[str, ...] = ("gaussian", "flow_grpo_cps")

Time = float | torch.Tensor


def _as_column(t: Time, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` time to ``(B, 1, ..., 1)`` on ``like``'s device, in float32
    (float64 when ``like`` is float64, so double-precision checks stay exact)."""
    t = torch.as_tensor(t, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"time must be a scalar or a (B,) tensor with B={like.shape[0]}, got shape {tuple(t.shape)}"
        )
    return t.view(-1, *([1] * (like.ndim - 1)))


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is (bf16/fp16 models step in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def broadcast_std(std: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar, ``(B,)`` or already-broadcastable std as a float32 (float64 with float64 ``like``)
    tensor that broadcasts to ``like``."""
    std = torch.as_tensor(std, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)
    if std.ndim == 1 and like.ndim > 1 and std.shape[0] == like.shape[0]:
        std = std.view(-1, *([1] * (like.ndim - 1)))
    return std


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, t: Time) -> torch.Tensor:
    """Data prediction ``x0_hat = x - t v``."""
    return upcast(x) - _as_column(t, x) * upcast(v)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``x_next = x + v (t_next - t)``."""
    dt = _as_column(t_next, x) - _as_column(t, x)
    return upcast(x) + upcast(v) * dt


@dataclass(frozen=True)
class SDENoise:
    """Which stochastic step GRPO explores with, and how much noise it injects.

    ``kind``:
        - ``"flow_grpo"``: Flow-GRPO / MixGRPO, diffusion ``g(t) = a sqrt(t / (1 - t))``;
          ``level`` is ``a`` (0.7 Flow-GRPO SD3, 0.9 FLUX).
        - ``"dance"``: DanceGRPO's eta form, constant diffusion ``g = eta``; ``level`` is
          ``eta`` (about 0.3).
        - ``"cps"``: coefficients-preserving sampling, ``std = t_next sin(a pi / 2)``;
          ``level`` is ``a``.
        - ``"dpm"``: first-order SDE-DPM-Solver++ (MixGRPO's ``dpm_step`` with
          ``sde_solver=True``); the SDE fixes its own noise, ``level`` is not used.
        - ``"ddim"``: DDIM with ``eta = level`` (DDPO, DanceGRPO's SD path) on the VP model
          that shares the flow's marginals (:mod:`.vp`); ``eta = 1`` is DDPM's posterior.
    """

    kind: SDEKind = "flow_grpo"
    level: float = 0.7

    def __post_init__(self) -> None:
        if self.kind not in SDE_KINDS:
            raise ValueError(f"unknown SDE kind {self.kind!r}; choose one of {SDE_KINDS}")
        if not (math.isfinite(self.level) and self.level > 0):
            raise ValueError(f"SDE noise level must be a finite number > 0, got {self.level}")
        if self.kind in ("cps", "ddim") and self.level > 1:
            raise ValueError(f"{self.kind} noise level must be in (0, 1], got {self.level}")


def sde_moments(
    x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time, noise: SDENoise
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the Gaussian transition ``p(x_next | x)``.

    ``flow_grpo`` and ``dance`` discretise the reverse-time SDE with the ODE's marginals,
    ``dx = [v - g^2/2 * score] dt + g dW``, score ``= -eps_hat / t``::

        mean = x + [v + g(t)^2 / (2 t) * (x + (1 - t) v)] dt
        std  = g(t) * sqrt(-dt)

    with ``g(t) = a sqrt(t / (1 - t))`` (Flow-GRPO; at ``t = 1`` the denominator uses
    ``t_next``, as the reference code does) or ``g = eta`` (DanceGRPO).

    ``cps`` (coefficients-preserving sampling)::

        std  = t_next sin(a pi / 2)
        mean = x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - std^2)

    ``dpm``, first-order SDE-DPM-Solver++ (Lu et al. 2022, eq. for ``sde-dpmsolver++``; as
    Tencent-Hunyuan/MixGRPO @ e5cdd6a ``sampling_utils.dpm_solver_first_order_update`` and
    diffusers' ``DPMSolverMultistepScheduler``), with ``alpha = 1 - t``, ``sigma = t``,
    ``lambda = log(alpha / sigma)`` and ``h = lambda(t_next) - lambda(t) > 0``::

        mean = (t_next / t) e^{-h} x + (1 - t_next) (1 - e^{-2h}) x0_hat
        std  = t_next sqrt(1 - e^{-2h})

    (at ``t = 1``, ``e^{-h} = 0``; ``t_next = 0`` would leave no noise, so it is refused).

    ``ddim`` is DDIM's eta step (DDPO ``ddim_step_with_logprob``) in the flow coordinates
    ``y = x / c`` of :mod:`.vp`, with ``a, s, c`` of ``t`` and ``a', s', c'`` of ``t_next``::

        sigma_eta = eta sqrt((s'^2 / s^2) (1 - a^2 / a'^2))        (DDIM's std in x)
        std  = sigma_eta / c'
        mean = x0_hat (1 - t_next) + eps_hat sqrt(t_next^2 - std^2)

    the CPS form with DDIM's std; ``eta = 0`` is the Euler step.

    Returns:
        ``mean`` shaped like ``x`` (float32) and ``std`` broadcastable to it.
    """
    tc, tn = _as_column(t, x), _as_column(t_next, x)
    if bool((tn >= tc).any()) or bool((tn < 0).any()):
        raise ValueError("an SDE step needs 0 <= t_next < t")
    x, v = upcast(x), upcast(v)
    if noise.kind == "dpm":
        if bool((tn <= 0).any()):
            raise ValueError("an SDE-DPM-Solver step ending at t = 0 has no noise: keep the final step deterministic")
        e_h = (1 - tc) * tn / (tc * (1 - tn))  # e^{-h} = (alpha_s / sigma_s) / (alpha_t / sigma_t), 0 at t = 1
        keep = 1 - e_h**2
        mean = tn / tc * e_h * x + (1 - tn) * keep * (x - tc * v)
        return mean, tn * torch.sqrt(keep)
    eps_hat = x + (1 - tc) * v
    if noise.kind in ("cps", "ddim"):
        if noise.kind == "cps":
            std = tn * math.sin(noise.level * math.pi / 2)
        else:  # on the VP curve a^2 + s^2 = 1: (a, s) = (1 - t, t) / sqrt((1 - t)^2 + t^2)
            norm, norm_n = (1 - tc) ** 2 + tc**2, (1 - tn) ** 2 + tn**2
            s2, s2n, a2, a2n = tc**2 / norm, tn**2 / norm_n, (1 - tc) ** 2 / norm, (1 - tn) ** 2 / norm_n
            std = noise.level * torch.sqrt((s2n / s2) * (1 - a2 / a2n)) * torch.sqrt(norm_n)
        x0_hat = x - tc * v
        mean = x0_hat * (1 - tn) + eps_hat * torch.sqrt(tn**2 - std**2)
        return mean, std
    dt = tn - tc
    if noise.kind == "flow_grpo":
        t_den = torch.where(tc >= 1, tn, tc)
        g = noise.level * torch.sqrt(tc / (1 - t_den))
    else:  # dance
        g = torch.full_like(tc, noise.level)
    mean = x + (v + g**2 / (2 * tc) * eps_hat) * dt
    std = g * torch.sqrt(-dt)
    return mean, std


@dataclass(frozen=True)
class SDETransition:
    """One stochastic step: the sample and the Gaussian it was drawn from."""

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def standard_noise(
    shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``N(0, I)`` of ``shape``, drawn where the generator lives (the CPU in the trainer, so a
    seed gives the same noise on any device), then moved to ``device``.

    A sequence of ``n`` generators splits the rows into ``n`` equal contiguous blocks, block
    ``i`` drawn from generator ``i``: each group of a batch keeps its own noise stream, so its
    samples do not depend on which groups share the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        where = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)
    rows, n = shape[0], len(generator)
    if n == 0 or rows % n:
        raise ValueError(f"{rows} rows cannot be split evenly among {n} per-group generators")
    block = (rows // n, *shape[1:])
    return torch.cat([torch.randn(block, generator=g, device=g.device, dtype=dtype) for g in generator]).to(device)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: Time,
    t_next: Time,
    noise: SDENoise,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    eps: torch.Tensor | None = None,
) -> SDETransition:
    """Draw ``x_next = mean + std * eps``, ``eps ~ N(0, I)`` (see :func:`sde_moments`).

    Pass ``eps`` to control the noise exactly (e.g. zero noise reduces the ``flow_grpo``
    and ``dance`` steps to a drift-corrected Euler step).
    """
    mean, std = sde_moments(x, v, t, t_next, noise)
    if eps is None:
        eps = standard_noise(mean.shape, generator, mean.device, mean.dtype)
    return SDETransition(x_next=mean + std * eps.to(mean.dtype), mean=mean, std=std)


def gaussian_log_prob(
    x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: Reduction,
    form: LogProbForm = "gaussian",
) -> torch.Tensor:
    """``log N(x_next; mean, std^2 I)`` per element, reduced over all non-batch dims.

    ``reduction="mean"`` averages over dims, as Flow-GRPO, DanceGRPO and MixGRPO do (hence
    their tiny PPO clip ranges, 1e-4); ``"sum"`` is the true joint log-density.

    ``form="flow_grpo_cps"`` is Flow-GRPO's log-prob for its ``cps`` steps instead: the
    squared error ``-(x_next - mean)^2`` with every constant and the ``1 / (2 std^2)``
    dropped (yifan123/flow_grpo @ 54809b5, ``sd3_sde_with_logprob.py``). Not a density: its
    importance ratios have their own scale (the reference pairs it with clip 1e-5).

    Returns:
        ``(B,)`` float32.
    """
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ValueError(
            f"unknown log-prob reduction {reduction!r}; choose one of {LOG_PROB_REDUCTIONS}"
        )
    if form not in LOG_PROB_FORMS:
        raise ValueError(f"unknown log-prob form {form!r}; choose one of {LOG_PROB_FORMS}")
    std = broadcast_std(std, mean)
    if bool((std <= 0).any()):
        raise ValueError("log-prob needs std > 0; a deterministic step (t_next = 0) has no density")
    diff = upcast(x_next.detach()) - upcast(mean)
    if form == "flow_grpo_cps":
        log_p = -(diff**2)
    else:
        log_p = -(diff**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        log_p = log_p.expand_as(diff)
    dims = tuple(range(1, diff.ndim))
    return log_p.mean(dim=dims) if reduction == "mean" else log_p.sum(dim=dims)


def transition_log_prob(
    x: torch.Tensor,
    x_next: torch.Tensor,
    v: torch.Tensor,
    t: Time,
    t_next: Time,
    noise: SDENoise,
    reduction: Reduction,
    form: LogProbForm = "gaussian",
) -> torch.Tensor:
    """Log-density of a stored transition ``(x, x_next, t, t_next)`` under the velocity ``v``
    of the current parameters: the numerator of GRPO's importance ratio
    ``rho = exp(log p_theta(x_next | x) - log p_old(x_next | x))``.

    Differentiable through ``v``; ``x_next`` is treated as data.
    """
    mean, std = sde_moments(x, v, t, t_next, noise)
    return gaussian_log_prob(x_next, mean, std, reduction, form)

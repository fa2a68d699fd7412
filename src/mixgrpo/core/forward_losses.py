"""Likelihood-free objectives on the forward process: DiffusionNFT and AWM.

Neither needs the sampler's transition densities. A rollout's clean sample ``x0`` is noised
again, ``x_t = (1 - t) x0 + t eps`` with fresh ``eps``, and the model's velocity there is
scored against the flow-matching target ``u = eps - x0`` (our convention: ``t = 1`` is
noise, ``v = eps - x0``). So rollouts may come from any sampler, ODE or SDE, few steps or
many.

Every function is pure: tensors in, per-sample losses ``(B,)`` out.
"""

from __future__ import annotations

import torch

from .grpo import ppo_clip_terms
from .steps import Time, _as_column, upcast

__all__ = [
    "AWM_WEIGHTINGS",
    "OBJECTIVES",
    "awm_log_likelihood",
    "awm_loss",
    "flow_matching_target",
    "forward_noise",
    "nft_loss",
    "old_policy_decay",
    "optimality_probability",
    "velocity_regulariser",
]

# grpo: the PPO-clipped ratio of SDE transition densities (core.objective); the other two here
OBJECTIVES: tuple[str, ...] = ("grpo", "nft", "awm")
AWM_WEIGHTINGS: tuple[str, ...] = ("uniform", "t", "t2", "ghuber")


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, t: Time) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` (``t`` a float or ``(B,)``)."""
    tc = _as_column(t, x0)
    return (1 - tc) * upcast(x0) + tc * upcast(eps)


def flow_matching_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The conditional velocity ``u = eps - x0`` that the pretraining loss regresses on."""
    return upcast(eps) - upcast(x0)


def _mean_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's ``r = 1/2 + 1/2 clip(A / A_max, -1, 1)`` in ``[0, 1]`` (the paper's
    ``Z_c`` normaliser is ``A_max`` times the advantage std; NVlabs/DiffusionNFT @ 24af555
    ``scripts/train_nft_sd3.py``: ``clamp(clip(A, +-A_max) / A_max / 2 + 0.5, 0, 1)``)."""
    if not adv_clip > 0:
        raise ValueError(f"DiffusionNFT maps advantages to [0, 1] through A_max: adv_clip must be > 0, got {adv_clip}")
    a = advantages.clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2 + 0.5).clamp(0.0, 1.0)


def _adaptive_x0_loss(v: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: Time) -> torch.Tensor:
    """``mean ||x0_hat - x0||^2 / sg(max(mean |x0_hat - x0|, 1e-5))`` with ``x0_hat = x_t - t v``:
    DiffusionNFT's adaptive weighting (the error's own mean magnitude, in float64, detached)."""
    x0_hat = upcast(x_t) - _as_column(t, x_t) * upcast(v)
    err = x0_hat - upcast(x0)
    with torch.no_grad():
        weight = _mean_dims(err.double().abs()).clamp(min=1e-5).to(err.dtype)  # (B,)
    return _mean_dims(err**2) / weight


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: Time,
    r: torch.Tensor,
    beta: float,
    adv_clip: float,
) -> torch.Tensor:
    """DiffusionNFT's policy loss at one time per sample (NVlabs/DiffusionNFT @ 24af555,
    ``scripts/train_nft_sd3.py``; paper arXiv 2509.16117 Eq. 8 with the code's weighting):

        v+ = beta v_theta + (1 - beta) sg(v_old)           (implicit positive policy)
        v- = (1 + beta) sg(v_old) - beta v_theta           (implicit negative policy)
        L  = (A_max / beta) [ r l(v+) + (1 - r) l(v-) ]
        l(v) = mean (x_t - t v - x0)^2 / sg(mean |x_t - t v - x0|)

    ``l`` is the flow-matching loss in x0 space, ``t^2 mean (v - u)^2``, divided by its own
    detached mean error (the code's adaptive weighting). The factor ``A_max / beta`` is the
    code's (the paper's equation has none); it matters through gradient clipping and the
    weight of the regulariser.

    Args:
        v: ``(B, ...)`` the trained velocity at ``(x_t, t)`` (differentiable).
        v_old: ``(B, ...)`` the old (sampling) policy's velocity there (detached here).
        x_t: ``(B, ...)`` the forward-noised sample; ``x0`` the rollout's clean sample.
        t: the noise level, a float or ``(B,)``.
        r: ``(B,)`` optimality probabilities in ``[0, 1]`` (:func:`optimality_probability`).
        beta: the mixing coefficient (reference default 1; 0.1 for its OCR/multi-reward runs).
        adv_clip: ``A_max`` (5).

    Returns:
        ``(B,)`` losses.
    """
    if not beta > 0:
        raise ValueError(f"the NFT mixing coefficient beta must be > 0, got {beta}")
    v, v_old = upcast(v), upcast(v_old).detach()
    positive = beta * v + (1 - beta) * v_old
    negative = (1 + beta) * v_old - beta * v
    r = r.detach().to(v.dtype)
    terms = r * _adaptive_x0_loss(positive, x_t, x0, t) + (1 - r) * _adaptive_x0_loss(negative, x_t, x0, t)
    return terms * (adv_clip / beta)


def velocity_regulariser(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """``mean (v_theta - sg(v_ref))^2`` per sample: DiffusionNFT's (and AWM's) pull towards the
    reference model, weighted by ``kl_beta`` (DiffusionNFT: 1e-4)."""
    return _mean_dims((upcast(v) - upcast(v_ref).detach()) ** 2)


def awm_log_likelihood(v: torch.Tensor, u: torch.Tensor, t: Time, weighting: str = "ghuber",
                       power: float = 0.25) -> torch.Tensor:
    """AWM's per-sample surrogate log-likelihood of a clean sample at time ``t``, from the
    matching error ``m = mean (v - u)^2`` in float64 (scxue/advantage_weighted_matching @
    be51372, ``scripts/train_sd3_awm.py::compute_log_prob_awm``):

        uniform: -m      t: -t m      t2: -t^2 m
        ghuber:  -(t / p) [(m + 1e-10)^p - (1e-10)^p]     (reference configs: p = 0.25)

    Returns ``(B,)`` (float64)."""
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"unknown AWM weighting {weighting!r}; choose one of {AWM_WEIGHTINGS}")
    m = _mean_dims((v.double() - u.double()) ** 2)
    tc = torch.as_tensor(t, dtype=torch.float64, device=m.device)
    if weighting == "uniform":
        return -m
    if weighting == "t":
        return -tc * m
    if weighting == "t2":
        return -tc**2 * m
    if not power > 0:
        raise ValueError(f"the generalised-Huber power must be > 0, got {power}")
    return -((m + 1e-10) ** power - 1e-10**power) * tc / power


def awm_loss(log_likelihood: torch.Tensor, advantages: torch.Tensor, adv_clip: float | None,
             clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's policy loss (its ``exp_first`` form): the PPO-clipped ratio of
    :func:`awm_log_likelihood` at the current weights against itself at the weights the
    rollout was scored with, advantages scaled to ``[-1, 1]``:

        A_hat = clip(A, -A_max, A_max) / A_max
        rho   = exp(l_theta - sg(l_old)),  L = max(-A_hat rho, -A_hat clip(rho, 1 - c, 1 + c))

    The reference is on-policy (``l_old = sg(l_theta)``): ``rho = 1`` and the gradient is
    ``-A_hat grad l_theta``, advantage-weighted flow matching. Its configs use ``c = 1``.
    Returns ``(B,)`` losses and PPO stats."""
    a = advantages if adv_clip is None else advantages.clamp(-adv_clip, adv_clip) / adv_clip
    return ppo_clip_terms(log_likelihood, log_likelihood.detach(), a, clip_range)


def old_policy_decay(step: int, flat: int, rate: float, cap: float) -> float:
    """Decay ``d`` of the lagging copy ``theta_old <- d theta_old + (1 - d) theta`` after
    optimizer step ``step`` (counted from 1): 0 before ``flat``, then
    ``min(rate (step - flat), cap)`` (NVlabs/DiffusionNFT @ 24af555 ``return_decay``: type 1 is
    ``(0, 0.001, 0.5)``, type 2 ``(75, 0.0075, 0.999)``; AWM's EMA adapter ``(0, 0.001, 0.3)``)."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)

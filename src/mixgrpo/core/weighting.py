"""Dynamic weights for several rewards: the pure rules (tensors in, tensors out).

Three published ideas, each reduced to the rule that sets the weights ``w_j`` of rewards
``r^(j)`` at iteration ``k`` (the trainer keeps their state, :mod:`mixgrpo.train.weighting`):

* **progress** (in the spirit of APEX, arXiv 2601.06574: weight by learning progress). Each
  reward's batch mean ``m_j`` feeds a fast and a slow EMA and a running variance; its
  normalised progress is ``p_j = (fast_j - slow_j) / (sd_j + eps)``, and

      w_j = W * w0_j exp(-p_j / tau) / sum_l w0_l exp(-p_l / tau)

  with the static weights ``w0`` and ``W = sum_l w0_l``: a reward that stalls (or falls)
  gains weight, one that improves quickly lends weight to the others.
* **gradient** (MGDA, Sener & Koltun 2018; EMA-smoothed coefficients as MARBLE, arXiv
  2605.06507): with one policy gradient ``g_j`` per reward, the min-norm point of their
  convex hull

      alpha* = argmin_{alpha >= 0, sum alpha = 1} || sum_j alpha_j g_j ||^2

  is a direction that, to first order, lowers no reward's objective (it is zero only at a
  Pareto-stationary point). ``alpha`` is found by Frank-Wolfe on the Gram matrix
  ``G_jl = <g_j, g_l>`` (exact for two rewards), then smoothed ``alpha <- (1 - mu) alpha + mu alpha*``.
* **constraint** (Lagrangian relaxation): maximise the primary reward subject to floors
  ``E[r^(j)] >= f_j``. The Lagrangian ``r^(p) + sum_j lambda_j (r^(j) - f_j)`` is ascended
  in the policy with weights ``(1, lambda_j) / (1 + sum lambda)`` and descended in the
  multipliers by projected dual ascent ``lambda_j <- max(0, lambda_j + eta (f_j - m_j) / |f_j|)``
  (the relative shortfall, so ``eta`` is unit-free).
"""

from __future__ import annotations

import torch

__all__ = ["WEIGHTINGS", "constraint_weights", "dual_ascent", "min_norm_coefficients", "progress_weights"]

WEIGHTINGS: tuple[str, ...] = ("static", "progress", "gradient", "constraint")


def progress_weights(base: torch.Tensor, fast: torch.Tensor, slow: torch.Tensor, sd: torch.Tensor,
                     temperature: float, eps: float = 1e-8) -> torch.Tensor:
    """``w_j = W w0_j exp(-p_j / tau) / sum_l w0_l exp(-p_l / tau)``, ``p_j = (fast_j - slow_j) / (sd_j + eps)``.

    Args:
        base: ``(K,)`` static weights ``w0`` (>= 0, positive sum).
        fast, slow: ``(K,)`` fast and slow EMAs of each reward's batch mean.
        sd: ``(K,)`` running standard deviation of each reward's batch mean.
        temperature: ``tau`` > 0; large tau gives back the static weights.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    progress = (fast - slow) / (sd + eps)  # (K,)
    logits = torch.log(base) - progress / temperature  # log 0 = -inf keeps a zero weight at zero
    return base.sum() * torch.softmax(logits, dim=0)


def min_norm_coefficients(gram: torch.Tensor, iterations: int = 250, tol: float = 1e-12) -> torch.Tensor:
    """``argmin_{alpha in simplex} alpha^T G alpha`` for a Gram matrix ``G`` ``(K, K)``.

    Two rewards: the closed form ``alpha_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``.
    More: Frank-Wolfe with exact line search (MGDA's solver), from the best single vertex."""
    gram = gram.double()
    k = gram.shape[0]
    if gram.shape != (k, k) or k < 1:
        raise ValueError(f"gram must be a square (K, K) matrix, got {tuple(gram.shape)}")
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    if k == 2:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        a = ((gram[1, 1] - gram[0, 1]) / denom).clamp(0, 1) if denom > 0 else torch.tensor(0.5, dtype=torch.float64)
        return torch.stack([a, 1 - a])
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[int(torch.argmin(gram.diagonal()))] = 1.0
    for _ in range(iterations):
        grad = gram @ alpha  # half the gradient of alpha^T G alpha
        j = int(torch.argmin(grad))
        direction = -alpha.clone()
        direction[j] += 1.0  # towards vertex e_j
        curvature = direction @ gram @ direction
        if curvature <= 0:
            break
        step = float((-(grad @ direction) / curvature).clamp(0, 1))
        if step * direction.abs().max() < tol:
            break
        alpha = alpha + step * direction
    return alpha


def dual_ascent(lam: torch.Tensor, floors: torch.Tensor, means: torch.Tensor, scale: torch.Tensor, lr: float,
                eps: float = 1e-8) -> torch.Tensor:
    """``lambda <- max(0, lambda + eta (f - m) / (s + eps))`` with ``s = |f|`` from the caller: a
    multiplier grows while its reward is below its floor and shrinks back to 0 once it holds."""
    if not lr > 0:
        raise ValueError(f"dual learning rate must be > 0, got {lr}")
    return (lam + lr * (floors - means) / (scale + eps)).clamp(min=0)


def constraint_weights(primary: int, lam: torch.Tensor) -> torch.Tensor:
    """Weights ``(1, lambda_j) / (1 + sum lambda)`` of the Lagrangian's reward terms; ``lam`` is
    ``(K,)`` with the primary's entry ignored."""
    w = lam.clone().double()
    w[primary] = 1.0
    return w / w.sum()

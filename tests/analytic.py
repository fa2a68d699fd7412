"""Analytic flows with closed-form velocities, for testing samplers against exact answers.

For ``x_t = (1 - t) x0 + t eps`` with ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` and
``eps ~ N(0, I)``, each component gives ``x_t | k ~ N((1 - t) mu_k, c_k(t) I)`` with
``c_k(t) = (1 - t)^2 s_k^2 + t^2``, and the exact velocity ``v(x, t) = E[eps - x0 | x_t = x]``
is the posterior-weighted mix of the per-component velocities

    v_k(x, t) = [(t - (1 - t) s_k^2) (x - (1 - t) mu_k)] / c_k(t) - mu_k
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixtureFlow:
    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def _mu(self) -> torch.Tensor:
        return torch.tensor(self.means, dtype=torch.float64)  # (K, D)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact ``v(x, t)`` for ``x`` of shape ``(B, D)`` and ``t`` of shape ``(B,)``."""
        xd = x.double()
        t = t.double().view(-1, 1, 1)  # (B, 1, 1)
        mu = self._mu().unsqueeze(0)  # (1, K, D)
        s2 = torch.tensor(self.stds, dtype=torch.float64).view(1, -1, 1) ** 2
        c = (1 - t) ** 2 * s2 + t**2  # (B, K, 1)
        centered = xd.unsqueeze(1) - (1 - t) * mu  # (B, K, D)
        v_k = (t - (1 - t) * s2) * centered / c - mu
        log_w = (
            torch.log(torch.tensor(self.weights, dtype=torch.float64)).view(1, -1)
            - 0.5 * (centered**2).sum(-1) / c.squeeze(-1)
            - 0.5 * self.dim * torch.log(c.squeeze(-1))
        )
        w = torch.softmax(log_w, dim=1).unsqueeze(-1)  # (B, K, 1)
        return (w * v_k).sum(1).to(x.dtype)

    def moments(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean ``(D,)`` and per-dimension variance ``(D,)`` of ``x_t``."""
        pi = torch.tensor(self.weights, dtype=torch.float64).view(-1, 1)
        mu = (1 - t) * self._mu()
        c = torch.tensor([(1 - t) ** 2 * s**2 + t**2 for s in self.stds], dtype=torch.float64).view(-1, 1)
        mean = (pi * mu).sum(0)
        second = (pi * (c + mu**2)).sum(0)
        return mean, second - mean**2

    def sample_data(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        mu = self._mu()[k]
        s = torch.tensor(self.stds, dtype=torch.float64)[k].unsqueeze(1)
        return mu + s * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)


GAUSSIAN_2D = GaussianMixtureFlow(weights=(1.0,), means=((1.5, -0.5),), stds=(0.4,))
MIXTURE_2D = GaussianMixtureFlow(
    weights=(0.3, 0.7), means=((-2.0, 1.0), (1.5, -1.0)), stds=(0.5, 0.3)
)


def stderr_of_mean(var: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sqrt(var / n)


def stderr_of_variance(var: torch.Tensor, n: int) -> torch.Tensor:
    # Var of a sample variance of a Gaussian ~ 2 sigma^4 / n; mixtures are heavier-tailed,
    # callers use a generous multiple.
    return var * math.sqrt(2.0 / n)

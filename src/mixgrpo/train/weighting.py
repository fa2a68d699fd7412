"""The state of a dynamic reward weighting across iterations (the rules: :mod:`mixgrpo.core.weighting`).

Each iteration the trainer asks :meth:`RewardWeighting.weights` for the weights of this
iteration's advantages, then shows it the batch's mean rewards (:meth:`observe`): weights
depend only on earlier batches. Every rank sees the whole batch's rewards, so every rank
holds the same state. The state is a few float64 tensors, saved in checkpoints as
``state.weighting.<key>``, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import torch

from ..core.weighting import (
    constraint_weights,
    dual_ascent,
    min_norm_coefficients,
    progress_weights,
)

__all__ = ["RewardWeighting", "gradient_weighted_update", "make_weighting"]


class RewardWeighting:
    """``static``: the config's weights, always."""

    needs_gradients = False  # True: one policy gradient per reward, combined by `combine`

    def __init__(self, names: list[str], base: dict[str, float], cfg):
        self.names, self.cfg = names, cfg
        self.base = torch.tensor([base[n] for n in names], dtype=torch.float64)
        self.state: dict[str, torch.Tensor] = {"seen": torch.zeros((), dtype=torch.float64)}

    def current(self) -> torch.Tensor:
        return self.base

    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.current().tolist(), strict=True))

    def observe(self, means: dict[str, float]) -> None:
        m = torch.tensor([means[n] for n in self.names], dtype=torch.float64)
        self._observe(m)
        self.state["seen"] += 1

    def _observe(self, m: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"state.weighting.{k}": v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.state:
            key = f"state.weighting.{k}"
            if key not in state:
                raise ValueError(f"the checkpoint holds no {key}: it was written with another weighting.name; "
                                 "resume with the weighting it was trained with")
            self.state[k] = state[key].to(torch.float64).clone()


class ProgressWeighting(RewardWeighting):
    """Weights from each reward's normalised progress (fast minus slow EMA of its batch mean)."""

    def __init__(self, names, base, cfg):
        super().__init__(names, base, cfg)
        k = len(names)
        self.state.update(fast=torch.zeros(k, dtype=torch.float64), slow=torch.zeros(k, dtype=torch.float64),
                          var=torch.zeros(k, dtype=torch.float64))

    def current(self) -> torch.Tensor:
        if self.state["seen"] < self.cfg.warmup:  # the statistics are not settled yet
            return self.base
        s = self.state
        return progress_weights(self.base, s["fast"], s["slow"], s["var"].sqrt(), self.cfg.temperature)

    def _observe(self, m: torch.Tensor) -> None:
        s, c = self.state, self.cfg
        if s["seen"] == 0:
            s["fast"], s["slow"] = m.clone(), m.clone()
            return
        s["var"] = c.slow * s["var"] + (1 - c.slow) * (m - s["slow"]) ** 2
        s["fast"] = c.fast * s["fast"] + (1 - c.fast) * m
        s["slow"] = c.slow * s["slow"] + (1 - c.slow) * m


class GradientWeighting(RewardWeighting):
    """Min-norm (MGDA) coefficients of the per-reward policy gradients, EMA-smoothed."""

    needs_gradients = True

    def __init__(self, names, base, cfg):
        super().__init__(names, base, cfg)
        self.state["alpha"] = self.base / self.base.sum()

    def current(self) -> torch.Tensor:
        return self.state["alpha"]

    def combine(self, gram: torch.Tensor, active: list[int]) -> torch.Tensor:
        """The coefficients for this iteration, from the Gram matrix ``(K', K')`` of the gradients
        of the ``active`` rewards (those with signal; the others' target is 0)."""
        target = torch.zeros_like(self.state["alpha"])
        target[active] = min_norm_coefficients(gram)
        self.state["alpha"] = (1 - self.cfg.ema) * self.state["alpha"] + self.cfg.ema * target
        return self.state["alpha"]


class ConstraintWeighting(RewardWeighting):
    """Maximise ``primary`` with floors on the others: Lagrange multipliers by dual ascent."""

    def __init__(self, names, base, cfg):
        super().__init__(names, base, cfg)
        k = len(names)
        self.primary = names.index(cfg.primary)
        self.state.update(lam=torch.zeros(k, dtype=torch.float64), floors=torch.zeros(k, dtype=torch.float64))
        self.has_floor = torch.tensor([n in cfg.floors for n in names])

    def current(self) -> torch.Tensor:
        return constraint_weights(self.primary, self.state["lam"])

    def _observe(self, m: torch.Tensor) -> None:
        s, c = self.state, self.cfg
        if s["seen"] == 0:  # floors are fixed on the first batch: the starting policy's rewards
            given = torch.tensor([c.floors.get(n, 0.0) for n in self.names], dtype=torch.float64)
            s["floors"] = given * m if c.relative else given
        step = dual_ascent(s["lam"], s["floors"], m, s["floors"].abs(), c.dual_lr)
        s["lam"] = torch.where(self.has_floor, step, torch.zeros_like(step))

    def floors(self) -> dict[str, float]:
        return {n: f for n, f, h in zip(self.names, self.state["floors"].tolist(), self.has_floor.tolist(), strict=True) if h}


_KINDS = {"static": RewardWeighting, "progress": ProgressWeighting, "gradient": GradientWeighting,
          "constraint": ConstraintWeighting}


def make_weighting(names: list[str], base: dict[str, float], cfg) -> RewardWeighting:
    """The weighting ``cfg.name`` names over rewards ``names`` (sorted) with static weights ``base``."""
    return _KINDS[cfg.name](list(names), base, cfg)


class _CapturingLearner:
    """The trainer, except that ``optimizer_step`` keeps the accumulated gradient instead of
    stepping (and reports no step, so the update skips its after-step work)."""

    def __init__(self, trainer):
        self._trainer, self.grads, self.finite = trainer, None, True

    def __getattr__(self, name: str):
        return getattr(self._trainer, name)

    def optimizer_step(self, loss_finite: bool) -> bool:
        t = self._trainer
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in t.params]
        self.finite = loss_finite and all(bool(torch.isfinite(g).all()) for g in self.grads)
        t.optimizer.zero_grad(set_to_none=True)
        return False


def gradient_weighted_update(trainer, batch, advantages: list, update) -> dict[str, float]:
    """One backward pass set per reward (``update(learner, batch, advantages[j])``), then one
    optimizer step on ``sum_j alpha_j g_j`` with the weighting's min-norm coefficients. Under
    DDP each ``g_j`` is already averaged over ranks, so every rank computes the same alpha."""
    grads, rows, nonfinite = [], [], False
    for adv in advantages:
        learner = _CapturingLearner(trainer)
        rows.append(update(learner, batch, adv))
        nonfinite |= learner.grads is not None and not learner.finite
        grads.append(learner.grads if learner.grads is not None and learner.finite else None)
    active = [j for j, g in enumerate(grads) if g is not None]  # rewards with signal this iteration
    stats = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if not active or nonfinite:  # nothing to learn, or a NaN/Inf gradient: no step (the caller counts the latter)
        stats["skipped_update"] = float(nonfinite)
        return stats
    flat = torch.stack([torch.cat([g.reshape(-1).double() for g in grads[j]]) for j in active])  # (K', P)
    alpha = trainer.weighting.combine(flat @ flat.T, active)
    with torch.no_grad():
        for i, p in enumerate(trainer.params):
            p.grad = sum(float(alpha[j]) * grads[j][i] for j in active).to(p.dtype)
    stepped = trainer.optimizer_step(True)
    if stepped and trainer.old is not None:  # what the forward-process update does after its step
        stats["old_decay"] = trainer.old.update(trainer.params, trainer.optimizer_steps)
    stats["skipped_update"] = 0.0 if stepped else 1.0
    stats["grad_norm_combined"] = float((alpha[active].to(flat) @ flat).norm())
    return stats

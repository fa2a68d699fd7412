"""Model-pass accounting: how many velocity evaluations one trained image costs.

Sampling costs one pass per step of the plan (doubled with classifier-free guidance);
training costs one forward (+ backward) pass per trained SDE step. For T = 25:

=====================  ========  ========  =====  ========================================
method                 sampling  training  total  paper (MixGRPO Table 1 / text)
=====================  ========  ========  =====  ========================================
Flow-GRPO              25        24        49     ~50: the final step (to t = 0) has no
                                                  SDE density, so it is never trained
DanceGRPO              25        14        39     ~39: 60% of the 24 trainable steps,
                                                  ``int(0.6 * 24) = 14``
MixGRPO                25        4         29     29
MixGRPO-Flash          11        4         15     window at 0-3, 7 DPM-Solver++ steps after
                                                  it (``int((25 - 3) * 0.4) = 8`` points)
MixGRPO-Flash*         7         4         11     frozen window 0-3, compression 0.2
                                                  (``int(22 * 0.2) = 4`` points, 3 steps)
=====================  ========  ========  =====  ========================================

The paper quotes a sampler speed-up estimate ``T / (w + (T - w) * 0.5)`` for Flash; our
counts are exact for the grids the public code builds (Flash's tail grid shrinks as the
window moves, so its sampling cost depends on the window's position).
"""

from __future__ import annotations

from dataclasses import dataclass

from .sampler import SamplingPlan

__all__ = ["ModelPasses", "count_model_passes"]


@dataclass(frozen=True)
class ModelPasses:
    sampling: int
    training: int

    @property
    def total(self) -> int:
        return self.sampling + self.training


def count_model_passes(
    plan: SamplingPlan, num_trained_steps: int, *, cfg: bool = False
) -> ModelPasses:
    """Passes per trained image for a sampling ``plan`` and ``num_trained_steps`` loss steps.

    ``cfg=True`` doubles both (conditional + unconditional branch each pass).
    """
    if not 0 <= num_trained_steps <= len(plan.sde_steps):
        raise ValueError(
            f"num_trained_steps must be in [0, {len(plan.sde_steps)}] (the plan's SDE steps), "
            f"got {num_trained_steps}"
        )
    factor = 2 if cfg else 1
    return ModelPasses(sampling=plan.num_steps * factor, training=num_trained_steps * factor)

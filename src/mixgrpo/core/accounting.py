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

from .grids import uniform_grid
from .sampler import SamplingPlan, flash_plan, mixed_plan

__all__ = ["ModelPasses", "count_model_passes", "format_model_pass_table", "reference_model_passes"]


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


def reference_model_passes(num_steps: int = 25, shift: float = 3.0) -> dict[str, ModelPasses]:
    """Passes per trained image of each method's reference structure at ``num_steps``:
    Flow-GRPO (SDE and loss on every trainable step), DanceGRPO (SDE everywhere, loss on
    ``int(0.6 (T - 1))`` steps), MixGRPO (window of 4), Flash (window 0-3, compression 0.4),
    Flash* (window 0-3, compression 0.2)."""
    if num_steps < 6:
        raise ValueError(f"the reference table needs num_steps >= 6 (a 4-step window and a tail), got {num_steps}")
    grid = uniform_grid(num_steps, shift=shift)
    trainable = list(range(num_steps - 1))
    window = [0, 1, 2, 3]
    return {
        "flow-grpo": count_model_passes(mixed_plan(grid, trainable), len(trainable)),
        "dance-grpo": count_model_passes(mixed_plan(grid, trainable), int(0.6 * len(trainable))),
        "mixgrpo": count_model_passes(mixed_plan(grid, window), len(window)),
        "mixgrpo-flash": count_model_passes(flash_plan(num_steps, window, 0.4, shift), len(window)),
        "mixgrpo-flash-star": count_model_passes(flash_plan(num_steps, window, 0.2, shift), len(window)),
    }



def format_model_pass_table(num_steps: int = 25, shift: float = 3.0) -> str:
    """:func:`reference_model_passes` as a plain-text table."""
    rows = [f"{'method':<20}{'sampling':>10}{'training':>10}{'total':>8}"]
    for name, passes in reference_model_passes(num_steps, shift).items():
        rows.append(f"{name:<20}{passes.sampling:>10}{passes.training:>10}{passes.total:>8}")
    return "\n".join(rows)

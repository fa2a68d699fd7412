"""Model-pass accounting: how many velocity evaluations one trained image costs.

Sampling costs one pass per step of the plan (doubled with classifier-free guidance);
training costs one forward (+ backward) pass per trained SDE step, and a KL term one more
forward pass of the reference policy per trained step. The per-method figures are derived
from the presets themselves (:func:`mixgrpo.train.plans.preset_model_passes`), so there is
no second copy of the methods' parameters here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sampler import SamplingPlan

__all__ = ["ModelPasses", "count_model_passes"]


@dataclass(frozen=True)
class ModelPasses:
    sampling: float  # rollout passes (the plan's steps; fewer per image with shared tree prefixes)
    training: float  # policy passes of the loss (forward + backward)
    reference: float = 0  # frozen-policy passes, forward only: the KL's reference, the NFT / AWM old policy

    @property
    def total(self) -> float:
        return self.sampling + self.training + self.reference


def count_model_passes(
    plan: SamplingPlan, num_trained_steps: int, *, cfg: bool = False, kl: bool = False, old: bool = False,
    forward: bool = False,
) -> ModelPasses:
    """Passes per trained image for a sampling ``plan`` and ``num_trained_steps`` loss steps.

    ``cfg=True`` doubles every pass (conditional + unconditional branch); ``kl=True`` adds a
    reference-policy pass per trained step, ``old=True`` one of the old policy (DiffusionNFT,
    AWM's EMA KL). ``forward=True``: the loss steps are times of the forward process, not the
    plan's SDE steps (DiffusionNFT, AWM), so any number is allowed.
    """
    if num_trained_steps < 0 or (not forward and num_trained_steps > len(plan.sde_steps)):
        raise ValueError(
            f"num_trained_steps must be in [0, {len(plan.sde_steps)}] (the plan's SDE steps), "
            f"got {num_trained_steps}"
        )
    factor = 2 if cfg else 1
    training = num_trained_steps * factor
    return ModelPasses(sampling=plan.num_steps * factor, training=training, reference=training * (int(kl) + int(old)))

"""One iteration's rollout as the trainer passes it around, and what can go wrong in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..core.sampler import Rollout, SamplingPlan
from ..models.tiny_dit import TextCondition

__all__ = ["Learner", "NonFiniteError", "RolloutBatch", "iteration_generator", "nonfinite_samples"]


class Learner(Protocol):
    """What an update function needs from the trainer (:class:`~mixgrpo.train.trainer.GRPOTrainer`):
    the config, the policy and its optimizer, the frozen copies, the process group."""

    cfg: Any  # TrainConfig
    device: torch.device
    dist: Any  # Dist
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ddp: Any  # DistributedDataParallel | None
    old: Any  # OldPolicy | None
    optimizer_steps: int
    noise: Any  # SDENoise
    loss_spec: Any  # LossSpec

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, *, reference: bool = False) -> torch.Tensor: ...

    def train_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor: ...

    def optimizer_step(self, loss_finite: bool) -> bool: ...


class NonFiniteError(ValueError):
    """Too many consecutive iterations with NaN/Inf; the message says what and how to go on."""


@dataclass
class RolloutBatch:
    """One iteration's samples: ``P * G`` images, group-contiguous."""

    prompts: list[str]
    cond: TextCondition
    rollout: Rollout
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    trained: list[int]  # positions in rollout.transitions that carry the loss
    plan: SamplingPlan
    group_size: int  # members per group in this batch (after any pruning)
    rewards: dict[str, torch.Tensor] | None = None  # already scored (rewards_in_background)
    trained_mask: torch.Tensor | None = None  # (N, len(trained)) bool: the trained steps of each sample; None: all
    loss_times: torch.Tensor | None = None  # (N, K) forward-process objectives: each sample's K loss times
    iteration: int = 0
    row_ids: list[int] | None = None  # each sample's row in the whole batch (all ranks): its noise streams

    def sample_mask(self) -> torch.Tensor:
        """``(N, len(trained))`` bool: which of the trained positions each sample trains."""
        if self.trained_mask is not None:
            return self.trained_mask
        return torch.ones(self.images.shape[0], len(self.trained), dtype=torch.bool)


def iteration_generator(seed: int, iteration: int, stream: int, *more: int) -> torch.Generator:
    """The generator of one random stream of an iteration: prompts (1), noise (2, per group)."""
    entropy = [seed, iteration, stream, *more]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))


def nonfinite_samples(batch: RolloutBatch, rewards: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """``(N,)`` mask of samples with a non-finite latent, log-prob or reward, and what was bad."""
    out, reasons = batch.rollout, []
    bad = ~torch.isfinite(out.x0).flatten(1).all(1).cpu()
    if bad.any():
        reasons.append(f"{int(bad.sum())} non-finite latent(s)")
    if batch.trained:
        lp_bad = ~torch.isfinite(out.transitions.log_prob[batch.trained]).all(0).cpu()
        if (lp_bad & ~bad).any():
            reasons.append(f"{int((lp_bad & ~bad).sum())} non-finite log-prob(s)")
        bad |= lp_bad
    for name, r in rewards.items():
        r_bad = ~torch.isfinite(r)
        if r_bad.any():
            reasons.append(f"reward {name!r} non-finite for {int(r_bad.sum())} image(s)")
        bad |= r_bad
    return bad, reasons

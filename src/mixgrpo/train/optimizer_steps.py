"""The optimisation skeleton both updates share (GRPO in :mod:`.grpo_update`, the forward-process
objectives in :mod:`.forward_update`): per inner epoch, ``optim.minibatches`` optimizer steps,
each on its part of the rollout (:func:`~mixgrpo.core.minibatches.minibatch_parts`), with
gradients accumulated over micro-batches and all-reduced once per step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TypeVar

import torch

from ..core.grpo import Advantages
from ..core.minibatches import minibatch_parts
from .batch import Learner, RolloutBatch, iteration_generator
from .distributed import sum_over_ranks

__all__ = ["accumulate_and_step", "epoch_parts"]

Work = TypeVar("Work")


def epoch_parts(trainer: Learner, batch: RolloutBatch, adv: Advantages, epoch: int) -> list[torch.Tensor]:
    """This rank's rows of each optimizer step of inner epoch ``epoch``. ``random`` and
    ``balance`` orders draw from ``(seed, iteration, 4, group's first row, epoch)``, so the
    parts depend neither on the rank holding a group nor on the world size."""
    o = trainer.cfg.optim
    g = batch.group_size
    first_rows = batch.row_ids[::g] if batch.row_ids is not None else range(0, adv.valid.numel(), g)
    generators = [iteration_generator(trainer.cfg.seed, batch.iteration, 4, int(r), epoch) for r in first_rows]
    return minibatch_parts(adv.advantages, adv.valid, g, o.minibatches, o.minibatch_order, generators)


def accumulate_and_step(trainer: Learner, work: Sequence[Work], backward: Callable[[Work], float],
                        join: Callable[[], None]) -> tuple[float, bool]:
    """One optimizer step: ``backward(item)`` for each item of ``work`` (it returns its loss),
    gradients all-reduced on the last one only; a rank with no work joins that all-reduce
    through ``join`` (a zero-gradient backward). Returns the loss summed over ranks and
    whether the step was taken (False: NaN/Inf, the step dropped)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.ddp is not None and not work:
        join()
    local = 0.0
    for n, item in enumerate(work):
        sync = trainer.ddp.no_sync() if trainer.ddp is not None and n < len(work) - 1 else nullcontext()
        with sync:
            local += backward(item)
    loss = sum_over_ranks(local, trainer.dist)
    return loss, trainer.optimizer_step(math.isfinite(loss))

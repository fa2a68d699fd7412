"""The update of the forward-process objectives (DiffusionNFT, AWM) and their old policy.

GRPO scores the stored SDE transitions of a rollout; these objectives only read its clean
samples ``x0``. Each sample is noised again at its loss times (drawn by the schedule from
the training grid, see :meth:`~mixgrpo.core.windows.WindowSchedule.sample_steps`) with
fresh noise from ``(seed, iteration, 3, row, epoch)``, so the draw depends neither on the
micro-batch size nor on the rank that holds the sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..core.forward_losses import (
    awm_log_likelihood,
    awm_loss,
    flow_matching_target,
    forward_noise,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    velocity_regulariser,
)
from ..core.grpo import Advantages
from .batch import Learner, RolloutBatch, iteration_generator
from .distributed import sum_over_ranks
from .optimizer_steps import accumulate_and_step, epoch_parts

__all__ = ["OldPolicy", "forward_update"]

_STATS = ("clip_frac", "approx_kl", "ratio_mean", "kl", "old_kl")


class OldPolicy:
    """A lagging copy of the trained parameters, ``theta_old <- d theta_old + (1 - d) theta``
    after each optimizer step (DiffusionNFT's old policy, which also samples; AWM's EMA
    adapter, which only anchors a KL term). :meth:`swapped` puts it in the model's place."""

    def __init__(self, params: Sequence[torch.nn.Parameter], flat: int, rate: float, cap: float):
        self.tensors = [p.detach().clone() for p in params]
        self.flat, self.rate, self.cap = flat, rate, cap

    @contextmanager
    def swapped(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        """The model runs with the old weights inside the block (pointer swaps, no copies)."""
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: Sequence[torch.nn.Parameter]) -> None:
        for i, p in enumerate(params):
            p.data, self.tensors[i] = self.tensors[i], p.data

    @torch.no_grad()
    def update(self, params: Sequence[torch.nn.Parameter], step: int) -> float:
        """Blend in the weights after optimizer step ``step`` (from 1); returns the decay used."""
        d = old_policy_decay(step, self.flat, self.rate, self.cap)
        for old, p in zip(self.tensors, params, strict=True):
            old.mul_(d).add_(p.detach(), alpha=1 - d)
        return d


def _fresh_noise(batch: RolloutBatch, seed: int, epoch: int, shape: torch.Size) -> torch.Tensor:
    """``(N, K, ...)`` standard normal noise, one stream per sample (by its row in the whole batch)."""
    return torch.stack([
        torch.randn(shape, generator=iteration_generator(seed, batch.iteration, 3, row, epoch))
        for row in batch.row_ids
    ])


def forward_update(trainer: Learner, batch: RolloutBatch, adv: Advantages) -> dict[str, float]:
    """``optim.minibatches`` optimizer steps per inner epoch (:mod:`.optimizer_steps`) on the
    objective's loss, averaged over the part's samples and their ``K`` loss times (each
    sample's term weighs ``1 / (n_part * K)``, as the references divide by their accumulation
    count):

    - ``nft``: :func:`~mixgrpo.core.forward_losses.nft_loss` with ``r`` from the advantages;
    - ``awm``: :func:`~mixgrpo.core.forward_losses.awm_loss` of
      :func:`~mixgrpo.core.forward_losses.awm_log_likelihood`;

    plus ``kl_beta mean (v - v_ref)^2`` (reference model) and ``old_kl_beta mean (v - v_old)^2``.
    The old policy is blended in after every optimizer step.
    """
    cfg, lc = trainer.cfg, trainer.cfg.loss
    device = trainer.device
    advantages = adv.advantages.to(device)
    stats = {"loss": 0.0, **dict.fromkeys(_STATS, 0.0), "skipped_update": 0.0, "old_decay": 0.0}
    times = batch.loss_times
    if round(sum_over_ranks(float(adv.valid.sum()), trainer.dist)) == 0 or times is None or times.shape[1] == 0:
        return stats
    k_times = times.shape[1]
    x0 = batch.rollout.x0.float()
    need_old = lc.objective == "nft" or lc.old_kl_beta > 0
    r = optimality_probability(advantages, lc.adv_clip) if lc.objective == "nft" else None
    trainer.model.train()
    eps_all = None  # (N, K, ...) this epoch's fresh noise

    def backward(item: tuple[int, torch.Tensor, float]) -> float:
        k, idx, weight = item  # loss time k of samples idx
        cond = batch.cond.index(idx)
        t = times[idx, k].to(device)  # (b,)
        eps = eps_all[idx, k]
        x_t = forward_noise(x0[idx], eps, t)
        u = flow_matching_target(x0[idx], eps)
        with torch.no_grad():
            v_old = None
            if need_old:
                with trainer.old.swapped(trainer.params):
                    v_old = trainer.velocity(x_t, t, cond)
            v_ref = trainer.velocity(x_t, t, cond, reference=True) if lc.kl_beta > 0 else None
        v = trainer.train_velocity(x_t, t, cond)
        if lc.objective == "nft":
            per_sample = nft_loss(v, v_old, x_t, x0[idx], t, r[idx], lc.nft_beta, lc.adv_clip)
        else:
            ll = awm_log_likelihood(v, u, t, lc.awm_weighting, lc.awm_power)
            per_sample, st = awm_loss(ll, advantages[idx], lc.adv_clip, lc.clip_range)
            for key in ("clip_frac", "approx_kl", "ratio_mean"):
                stats[key] += st[key].item()
        per_sample = per_sample.float()
        if v_ref is not None:
            kl = velocity_regulariser(v, v_ref)
            per_sample = per_sample + lc.kl_beta * kl
            stats["kl"] += kl.mean().item()
        if lc.old_kl_beta > 0:
            old_kl = velocity_regulariser(v, v_old)
            per_sample = per_sample + lc.old_kl_beta * old_kl
            stats["old_kl"] += old_kl.mean().item()
        loss = per_sample.sum() * weight
        (loss * trainer.dist.world_size).backward()
        return loss.item()

    def join() -> None:  # this rank joins the all-reduce with a zero gradient
        first = torch.zeros(1, dtype=torch.long, device=device)
        (trainer.train_velocity(x0[first], times[first, 0].to(device), batch.cond.index(first)) * 0).sum().backward()

    terms = steps = 0
    for epoch in range(cfg.optim.inner_epochs):
        eps_all = _fresh_noise(batch, cfg.seed, epoch, torch.Size((k_times, *x0.shape[1:]))).to(device)
        for part in epoch_parts(trainer, batch, adv, epoch):
            part = part.to(device)
            n_part = round(sum_over_ranks(float(part.numel()), trainer.dist))
            if n_part == 0:
                continue  # no rank has a sample in this part: no step
            chunks = [c for c in part.split(cfg.optim.micro_batch) if c.numel()]
            work = [(k, idx, 1.0 / (n_part * k_times)) for k in range(k_times) for idx in chunks]
            loss, stepped = accumulate_and_step(trainer, work, backward, join)
            stats["loss"] += loss
            terms += len(work)
            steps += 1
            if not stepped:
                stats["skipped_update"] = 1.0
            elif need_old:
                stats["old_decay"] = trainer.old.update(trainer.params, trainer.optimizer_steps)
    for key in _STATS:
        stats[key] /= max(terms, 1)
    stats["loss"] /= max(steps, 1)
    return stats

"""The GRPO update: the PPO-clipped ratio of each trained SDE step's transition density
(:func:`~mixgrpo.core.objective.step_loss`), gradients accumulated over micro-batches of the
samples that carry signal, ``optim.minibatches`` optimizer steps per inner epoch
(:mod:`.optimizer_steps`)."""

from __future__ import annotations

import torch

from ..core.grpo import Advantages
from ..core.objective import step_loss
from .batch import Learner, RolloutBatch
from .distributed import sum_over_ranks
from .optimizer_steps import accumulate_and_step, epoch_parts

__all__ = ["grpo_update"]

_STATS = ("clip_frac", "approx_kl", "ratio_mean", "kl")


def grpo_update(trainer: Learner, batch: RolloutBatch, adv: Advantages) -> dict[str, float]:
    """In each optimizer step's part, a sample's terms weigh ``1 / (n_part * its trained
    steps)``: the loss is the mean over the part's samples of their mean over trained steps;
    with per-step advantages (BranchGRPO's tree edges) every edge weighs the same,
    ``1 / edges``. The reported loss is the mean over optimizer steps."""
    cfg, tr = trainer.cfg, batch.rollout.transitions
    advantages = adv.advantages.to(trainer.device)
    stats = {"loss": 0.0, **dict.fromkeys(_STATS, 0.0), "skipped_update": 0.0}
    if round(sum_over_ranks(float(adv.valid.sum()), trainer.dist)) == 0 or not batch.trained:
        return stats
    trainer.model.train()
    mask = batch.sample_mask().to(trainer.device)  # (N, len(trained))
    per_step = adv.per_step.to(trainer.device) if adv.per_step is not None else None

    def backward(item: tuple[int, int, torch.Tensor, torch.Tensor]) -> float:
        j, s, idx, weight = item  # trained step j at grid position s, its samples and their weights
        t, t_next = tr.t[s].item(), tr.t_next[s].item()
        cond = batch.cond.index(idx)
        t_vec = torch.full((idx.numel(),), t, device=trainer.device)
        x = tr.x[s][idx]
        v = trainer.train_velocity(x, t_vec, cond)
        v_ref = None
        if trainer.loss_spec.kl_beta > 0:
            with torch.no_grad():
                v_ref = trainer.velocity(x, t_vec, cond, reference=True)
        a = per_step[idx, j] if per_step is not None else advantages[idx]
        per_sample, st = step_loss(v, x, tr.x_next[s][idx], tr.log_prob[s][idx], a, t, t_next, trainer.noise,
                                   trainer.loss_spec, v_ref, tr.mean[s][idx] if tr.mean is not None else None)
        loss = (per_sample * weight.to(per_sample.dtype)).sum()
        # DDP and FSDP average gradients over ranks; this loss is a sum over all ranks' samples
        (loss * trainer.dist.world_size).backward()
        for key in _STATS:
            stats[key] += st[key].item()
        return loss.item()

    def join() -> None:  # this rank has nothing in the step, but must join the all-reduce
        first = torch.zeros(1, dtype=torch.long, device=trainer.device)
        s0 = batch.trained[0]
        t0 = torch.full((1,), tr.t[s0].item(), device=trainer.device)
        (trainer.train_velocity(tr.x[s0][first], t0, batch.cond.index(first)) * 0).sum().backward()

    terms = steps = 0
    for epoch in range(cfg.optim.inner_epochs):
        for part in epoch_parts(trainer, batch, adv, epoch):
            part = part.to(trainer.device)
            n_part = round(sum_over_ranks(float(part.numel()), trainer.dist))  # the loss averages over all ranks
            if n_part == 0:
                continue  # no rank has a sample in this part: no step
            if per_step is not None:  # tree edges: each once, all with the same weight (mean over edges)
                edges = round(sum_over_ranks(float(mask[part].sum()), trainer.dist))
                weight = torch.full((mask.shape[0],), 1.0 / max(edges, 1), dtype=torch.float64, device=trainer.device)
            else:
                weight = 1.0 / (n_part * mask.sum(1).clamp(min=1).double())  # per sample
            chunks = [c for c in part.split(cfg.optim.micro_batch) if c.numel()]
            work = [(j, s, idx[mask[idx, j]]) for j, s in enumerate(batch.trained) for idx in chunks]
            work = [(j, s, idx, weight[idx]) for j, s, idx in work if idx.numel()]
            loss, stepped = accumulate_and_step(trainer, work, backward, join)
            stats["loss"] += loss
            stats["skipped_update"] = max(stats["skipped_update"], 0.0 if stepped else 1.0)
            terms += len(work)
            steps += 1
    for key in _STATS:
        stats[key] /= max(terms, 1)
    stats["loss"] /= max(steps, 1)
    return stats

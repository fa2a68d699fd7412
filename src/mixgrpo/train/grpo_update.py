"""The GRPO update: the PPO-clipped ratio of each trained SDE step's transition density
(:func:`~mixgrpo.core.objective.step_loss`), gradients accumulated over micro-batches of the
samples that carry signal, one optimizer step per inner epoch."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..core.grpo import Advantages
from ..core.objective import step_loss
from .batch import Learner, RolloutBatch
from .distributed import sum_over_ranks

__all__ = ["grpo_update"]


def grpo_update(trainer: Learner, batch: RolloutBatch, adv: Advantages) -> dict[str, float]:
    """Each sample's terms weigh ``1 / (n_valid * its trained steps)``: the loss is the mean
    over samples of their mean over trained steps; with per-step advantages (BranchGRPO's
    tree edges) every edge weighs the same, ``1 / edges``."""
    cfg, tr = trainer.cfg, batch.rollout.transitions
    valid = adv.valid.nonzero().squeeze(1).to(trainer.device)
    advantages = adv.advantages.to(trainer.device)
    stats = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0, "kl": 0.0, "skipped_update": 0.0}
    n_valid = round(sum_over_ranks(float(valid.numel()), trainer.dist))  # the loss averages over all ranks' samples
    if n_valid == 0 or not batch.trained:
        return stats
    trainer.model.train()
    mask = batch.sample_mask().to(trainer.device)  # (N, len(trained))
    weight = 1.0 / (n_valid * mask.sum(1).clamp(min=1).double())  # per sample
    per_step = adv.per_step.to(trainer.device) if adv.per_step is not None else None
    if per_step is not None:  # tree edges: each once, all with the same weight (mean over edges)
        edges = round(sum_over_ranks(float(mask[valid].sum()), trainer.dist))
        weight = torch.full((mask.shape[0],), 1.0 / max(edges, 1), dtype=torch.float64, device=trainer.device)
    # DDP and FSDP average gradients over ranks; this loss is a sum over all ranks' samples
    chunks = [c for c in valid.split(cfg.optim.micro_batch) if c.numel()]  # none on a rank without signal
    work = [(j, s, idx[mask[idx, j]]) for j, s in enumerate(batch.trained) for idx in chunks]
    work = [(j, s, idx) for j, s, idx in work if idx.numel()]  # (trained step j at position s, its samples)
    terms = 0
    for _ in range(cfg.optim.inner_epochs):
        trainer.optimizer.zero_grad(set_to_none=True)
        epoch_loss = stats["loss"]
        if trainer.ddp is not None and not work:  # nothing here, but this rank must join the all-reduce
            first = torch.zeros(1, dtype=torch.long, device=trainer.device)
            s0 = batch.trained[0]
            t0 = torch.full((1,), tr.t[s0].item(), device=trainer.device)
            (trainer.train_velocity(tr.x[s0][first], t0, batch.cond.index(first)) * 0).sum().backward()
        for n, (j, s, idx) in enumerate(work):
            t, t_next = tr.t[s].item(), tr.t_next[s].item()
            # gradients are all-reduced once per optimizer step, on the last backward
            sync = trainer.ddp.no_sync() if trainer.ddp is not None and n < len(work) - 1 else nullcontext()
            with sync:
                cond = batch.cond.index(idx)
                t_vec = torch.full((idx.numel(),), t, device=trainer.device)
                x = tr.x[s][idx]
                v = trainer.train_velocity(x, t_vec, cond)
                v_ref = None
                if trainer.loss_spec.kl_beta > 0:
                    with torch.no_grad():
                        v_ref = trainer.velocity(x, t_vec, cond, reference=True)
                a = per_step[idx, j] if per_step is not None else advantages[idx]
                per_sample, st = step_loss(v, x, tr.x_next[s][idx], tr.log_prob[s][idx], a, t, t_next,
                                           trainer.noise, trainer.loss_spec, v_ref,
                                           tr.mean[s][idx] if tr.mean is not None else None)
                loss = (per_sample * weight[idx].to(per_sample.dtype)).sum()
                (loss * trainer.dist.world_size).backward()
                stats["loss"] += loss.item()
                for key in ("clip_frac", "approx_kl", "ratio_mean", "kl"):
                    stats[key] += st[key].item()
                terms += 1
        stats["loss"] = epoch_loss + sum_over_ranks(stats["loss"] - epoch_loss, trainer.dist)
        if not trainer.optimizer_step(math.isfinite(stats["loss"])):
            stats["skipped_update"] = 1.0
    for key in ("clip_frac", "approx_kl", "ratio_mean", "kl"):
        stats[key] /= max(terms, 1)
    stats["loss"] /= cfg.optim.inner_epochs
    return stats

"""A GRPO iteration's rollout: pick the prompts, draw the noise, sample the groups (chunked,
optionally scoring each chunk in a thread while the next samples, pruned or grown as a tree),
and the model passes that cost. Functions of the trainer (``self``:
:class:`~mixgrpo.train.trainer.GRPOTrainer`); every random draw comes from ``(seed, iteration)``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ..core.sampler import concat_rollouts, initial_noise, sample
from ..core.tree import sample_tree, tree_edge_mask
from ..inference.generate import noise_shape, start_samples
from .batch import RolloutBatch, iteration_generator
from .branching import ConditionedVelocity, make_pruning

__all__ = ["measured_passes", "rollout"]


def measured_passes(self: Any, batch: RolloutBatch) -> float:
    """Model passes actually spent per trained sample: rollout passes (after prefix sharing
    and pruning) plus loss passes (and, with a KL term, as many reference-policy passes),
    over the samples that enter the loss (OVF's k per group)."""
    per_call = 2 if self.cfg.sampler.guidance != 1.0 else 1
    n_groups = batch.images.shape[0] // batch.group_size
    trained_samples = n_groups * (self.cfg.loss.ovf_keep or batch.group_size)
    sampling = batch.rollout.row_passes * per_call
    lc = self.cfg.loss
    if batch.loss_times is not None:  # forward-process loss: its times, plus old-policy passes
        steps_per_sample = batch.loss_times.shape[1]
        with_reference = 1 + (lc.kl_beta > 0) + (lc.objective == "nft" or lc.old_kl_beta > 0)
    else:
        steps_per_sample = batch.sample_mask().sum(1).float().mean().item() if batch.trained else 0.0
        with_reference = 2 if lc.kl_beta > 0 else 1
    training = steps_per_sample * trained_samples * per_call * self.cfg.optim.inner_epochs * with_reference
    return (sampling + training) / trained_samples

@torch.no_grad()
def rollout(self: Any, iteration: int) -> RolloutBatch:
    """Sample the iteration's groups (in chunks of ``sampler.groups_per_call``; with
    ``rewards_in_background`` each chunk is decoded and scored in a thread while the next
    one samples)."""
    cfg, s = self.cfg, self.cfg.sampler
    g = cfg.group_size
    rng = np.random.default_rng([cfg.seed, iteration, 1])
    picks = rng.choice(len(self.train_prompts), size=cfg.prompts_per_iter, replace=False)
    local = self.dist.local_groups(cfg.prompts_per_iter)  # all of them in a single process
    p = len(local)
    prompts = [self.train_prompts[picks[i]] for i in local for _ in range(g)]
    cond = self.backend.condition(prompts)
    shape = noise_shape(self.model.config)  # (C, H, W), or (C, F, H, W) for video
    if s.noise_per_group:  # group i's stream: (seed, iteration, 2, i), whichever rank samples it
        gens = [iteration_generator(cfg.seed, iteration, 2, i) for i in local]
        x1 = torch.cat([initial_noise(1, g, shape, shared=s.shared_noise, generator=gen) for gen in gens])
    else:
        gens = [iteration_generator(cfg.seed, iteration, 2)]
        x1 = initial_noise(p, g, shape, shared=s.shared_noise, generator=gens[0])
    x1 = start_samples(self.model, x1, self.grid).to(self.device)  # flow models: the noise itself
    plan, trained = self.plan(iteration)
    self.model.eval()
    step = s.groups_per_call or p
    parts, finished = [], []
    old = self.old.swapped(self.params) if s.rollout_policy == "old" else nullcontext()
    ids = [gi * g + j for gi in local for j in range(g)]  # rows in the whole batch
    trained_set = set(trained)
    if s.tree_splits:  # BranchGRPO: one tree per group
        out = sample_tree(ConditionedVelocity(self.velocity, cond), x1, plan, self.noise, s.tree_splits,
                          s.split_noise_scale, group_size=g, reduction=cfg.loss.reduction,
                          generator=gens if s.noise_per_group else gens[0])
        images, _ = self._decode_and_score(out.x0, prompts, False)
        positions = [i for i, k in enumerate(out.transitions.step_index) if k in trained_set]
        steps = [out.transitions.step_index[i] for i in positions]
        return RolloutBatch(prompts, cond, out, images, positions, plan, g, None,
                            tree_edge_mask(p, g, s.tree_splits, steps), iteration=iteration, row_ids=ids)
    with old, ThreadPoolExecutor(1) if cfg.rewards_in_background else nullcontext() as pool:
        for first in range(0, p, step):
            groups = range(first, min(first + step, p))
            rows = torch.arange(groups.start * g, groups.stop * g, device=self.device)
            out = sample(ConditionedVelocity(self.velocity, cond.index(rows)), x1[rows], plan, self.noise,
                         reduction=cfg.loss.reduction, log_prob_form=cfg.loss.logprob_form,
                         generator=gens[groups.start : groups.stop] if s.noise_per_group else gens[0],
                         prefix_groups=g if s.shared_prefix else None, prune=make_pruning(plan, s, g),
                         record_mean=cfg.loss.ratio_norm)
            out.kept = out.kept + groups.start * g  # rows of the whole batch
            parts.append(out)
            kept_prompts = [prompts[i] for i in out.kept.tolist()]
            work = (self._decode_and_score, out.x0, kept_prompts, pool is not None)
            finished.append(pool.submit(*work) if pool is not None else work[0](*work[1:]))
    done = [f.result() if pool is not None else f for f in finished]
    out = concat_rollouts(parts)
    images = torch.cat([d[0] for d in done])
    rewards = {n: torch.cat([d[1][n] for d in done]) for n in self.rewards} if cfg.rewards_in_background else None
    group_size = g
    if s.prune_keep is not None:
        group_size = s.prune_keep
        prompts, cond = [prompts[i] for i in out.kept.tolist()], cond.index(out.kept)
    if cfg.loss.objective != "grpo":  # forward-process loss: each sample's loss times on the training grid
        steps = torch.from_numpy(self.schedule.sample_steps(iteration, ids))
        times = self.grid[:-1].float()[steps.nonzero()[:, 1]].view(len(ids), -1)
        return RolloutBatch(prompts, cond, out, images, [], plan, group_size, rewards, None, times, iteration, ids)
    positions = [i for i, k in enumerate(out.transitions.step_index) if k in trained_set]
    mask = None
    if self.schedule.per_sample:  # each sample its own steps, drawn by its row in the whole batch
        steps = [out.transitions.step_index[i] for i in positions]
        mask = torch.from_numpy(self.schedule.sample_steps(iteration, ids)[:, steps])[out.kept.cpu()]
    return RolloutBatch(prompts, cond, out, images, positions, plan, group_size, rewards, mask,
                        iteration=iteration, row_ids=ids)


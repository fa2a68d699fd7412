"""The GRPO trainer: rollout -> rewards -> group advantages -> clipped loss on the trained
steps -> AdamW. It never branches on the method's name; the config says which steps are
stochastic, which are trained and which sampler runs.

Every random draw of iteration ``i`` comes from generators seeded by ``(seed, i)``, so a
resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..core.grpo import Advantages, group_advantages, multi_reward_advantages
from ..core.objective import LossSpec
from ..core.ovf import max_variance_subset
from ..core.sampler import SamplingPlan
from ..core.steps import SDENoise
from ..core.tree import tree_advantages
from ..inference.generate import generate_prompts, has_time_grid, sampling_grid
from ..models.lora import adapters_disabled, add_lora
from ..models.tiny_dit import TextCondition
from ..rewards import check_reward_input, get_reward, score
from .backends import make_backend
from .batch import NonFiniteError, RolloutBatch, nonfinite_samples
from .config import TrainConfig
from .distributed import (
    Dist,
    all_gather_rows,
    check_distributed_config,
)
from .forward_update import OldPolicy, forward_update
from .fsdp import shard_model
from .grpo_update import grpo_update
from .plans import make_schedule, sampling_plan
from .rollout import measured_passes, rollout
from .weighting import gradient_weighted_update, make_weighting

__all__ = ["GRPOTrainer", "NonFiniteError", "RolloutBatch"]


class PolicyVelocity(torch.nn.Module):
    """``forward = model.velocity``: the module DDP wraps, so its hooks see the training passes."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, guidance: float) -> torch.Tensor:
        return self.model.velocity(x, t, cond, guidance)


class GRPOTrainer:
    """Holds the policy, optimizer and data; :meth:`step` runs one GRPO iteration."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module | None = None, dist: Dist | None = None):
        self.cfg = cfg = copy.deepcopy(cfg.validate())  # a private copy: the resolved shift goes in below
        self.dist = dist or Dist()
        check_distributed_config(cfg, self.dist)
        self.device = torch.device(cfg.model.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
            cfg.model.device = str(self.device)
        self.backend = make_backend(cfg, model)
        if cfg.sampler.shift == "scheduler":
            cfg.sampler.shift = self.backend.scheduler_shift
        self.model = self.backend.model
        self.reference: torch.nn.Module | None = None
        if cfg.model.lora_rank > 0:
            with torch.random.fork_rng(devices=[]):  # the adapter's random init depends on cfg.seed only
                torch.manual_seed(cfg.seed)
                add_lora(self.backend.lora_module, cfg.model.lora_rank, cfg.model.lora_alpha, self.backend.lora_targets)
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # the adapter trains in fp32 even over a bf16 base
        if cfg.model.gradient_checkpointing:
            self.backend.lora_module.enable_gradient_checkpointing()
        self.model.to(self.device)
        if cfg.model.lora_rank == 0 and cfg.loss.kl_beta > 0:
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.sharded = self.dist.enabled and cfg.parallel == "fsdp"
        if self.sharded:  # after the copy: the reference is sharded on its own
            bf16 = cfg.model.dtype == "bfloat16"
            shard_model(self.backend.lora_module, self.dist.world_size, self.device, bf16)
            if self.reference is not None:
                ref_root = getattr(self.reference, "transformer", self.reference)
                shard_model(ref_root, self.dist.world_size, self.device, bf16)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # names fixed now: FSDP swaps a module's parameter objects while it computes
        self.param_names, self.params = [n for n, _ in trainable], [p for _, p in trainable]
        self.ddp = None  # data parallel with replicated weights: the training forward goes through DDP
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(PolicyVelocity(self.model), find_unused_parameters=True,
                                               device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.optimizer_steps = 0  # taken so far (skipped ones not counted); the old policy's decay reads it
        self.ema = [p.detach().clone() for p in self.params] if cfg.optim.ema else None
        self.old: OldPolicy | None = None
        if cfg.loss.uses_old_policy:
            if self.sharded:
                raise ValueError(f"loss.objective={cfg.loss.objective} keeps an old policy, which FSDP sharding does "
                                 "not support yet: run it with parallel=ddp")
            lc = cfg.loss
            self.old = OldPolicy(self.params, lc.old_flat, lc.old_rate, lc.old_max)
        self.train_prompts, self.eval_prompts = self.backend.train_prompts, self.backend.eval_prompts
        self.rewards = {name: get_reward(name, **options) for name, options in cfg.reward_options.items()}
        for name, reward in self.rewards.items():  # the loaded model decides (the config may not have known)
            check_reward_input(reward, name, self.backend.video)
        self.weighting = make_weighting(sorted(cfg.rewards), cfg.reward_weights, cfg.weighting)
        s = cfg.sampler
        self.noise = SDENoise(s.sde_kind, s.noise_level)
        lc = cfg.loss
        self.loss_spec = LossSpec(lc.clip_range, lc.kl_beta, lc.reduction, lc.logprob_form, lc.kl_form, lc.ratio_norm,
                                  lc.step_weight)
        # the training grid: uniform_grid(num_steps, shift), or the model's own (a VP model's DDIM times)
        self.grid = sampling_grid(self.model, s.num_steps, s.shift)
        self.schedule = make_schedule(cfg)
        self.nonfinite_streak = 0  # consecutive iterations with NaN/Inf (see optim.max_nonfinite)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.model.dtype == "bfloat16" else nullcontext()
        )

    # ------------------------------------------------------------------ policy
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition, *, reference: bool = False) -> torch.Tensor:
        """The policy's (or the reference policy's) velocity, with guidance and autocast."""
        with self.autocast:
            if not reference:
                return self.model.velocity(x, t, cond, self.cfg.sampler.guidance).float()
            if self.reference is not None:
                return self.reference.velocity(x, t, cond, self.cfg.sampler.guidance).float()
            with adapters_disabled(self.model):
                return self.model.velocity(x, t, cond, self.cfg.sampler.guidance).float()

    def train_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The policy's velocity for the loss: through DDP under torchrun (its gradient hooks)."""
        if self.ddp is None:
            return self.velocity(x, t, cond)
        with self.autocast:
            return self.ddp(x, t, cond, self.cfg.sampler.guidance).float()

    # ------------------------------------------------------------------ rollout
    def plan(self, iteration: int) -> tuple[SamplingPlan, tuple[int, ...]]:
        """The sampling plan and the trained step indices (of the training grid)."""
        return sampling_plan(self.cfg, self.schedule, self.grid, iteration, model_grid=has_time_grid(self.model))

    def measured_passes(self, batch: RolloutBatch) -> float:
        """Model passes per trained sample (:func:`~mixgrpo.train.rollout.measured_passes`)."""
        return measured_passes(self, batch)

    def rollout(self, iteration: int) -> RolloutBatch:
        """The iteration's groups, sampled and scored (:func:`~mixgrpo.train.rollout.rollout`)."""
        return rollout(self, iteration)

    def _decode_and_score(self, x0: torch.Tensor, prompts: list[str], score_now: bool):
        """Images of final samples (CPU, [0, 1]) and, when asked, every reward on them."""
        images = self.backend.decode(x0).float().cpu()
        return images, (self._score_images(images, prompts) if score_now else None)

    def _score_images(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        clean = torch.nan_to_num(images, nan=0.0)  # NaN samples are found from their latents and dropped
        return {name: score(fn, clean, prompts, allow_nonfinite=True) for name, fn in self.rewards.items()}

    def score(self, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Every reward on the batch (scored during the rollout with ``rewards_in_background``);
        NaN/Inf scores come back as they are (see :meth:`nonfinite_samples`)."""
        return batch.rewards if batch.rewards is not None else self._score_images(batch.images, batch.prompts)

    nonfinite_samples = staticmethod(nonfinite_samples)

    def advantages(self, rewards: dict[str, torch.Tensor], group_size: int | None = None) -> Advantages:
        """Group advantages; with ``loss.ovf_keep = k`` only the k members of each group whose
        combined reward has maximal variance (Pro-GRPO's OVF) get one, the rest are not trained."""
        loss, g = self.cfg.loss, group_size or self.cfg.group_size
        options = dict(mode=loss.multi_reward_mode, **self._normalisation())
        weights = self.weighting.weights()  # the config's, or this iteration's dynamic ones
        if loss.ovf_keep is None:
            return multi_reward_advantages(rewards, weights, g, **options)
        total = sum(weights[n] * r for n, r in rewards.items()).view(-1, g)
        chosen = torch.cat([i * g + max_variance_subset(row, loss.ovf_keep) for i, row in enumerate(total)])
        sub = multi_reward_advantages({n: r[chosen] for n, r in rewards.items()}, weights, loss.ovf_keep, **options)
        advantages = torch.zeros(total.numel())
        valid = torch.zeros(total.numel(), dtype=torch.bool)
        advantages[chosen], valid[chosen] = sub.advantages, sub.valid
        return Advantages(advantages, valid, sub.num_zero_variance_groups)

    # ------------------------------------------------------------------ update
    def optimizer_step(self, loss_finite: bool) -> bool:
        """Clip the accumulated gradients and step (and the EMA); a NaN/Inf loss or gradient
        would poison the weights, so that step is dropped (returns False, the caller counts it)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not (torch.isfinite(grad_norm) and loss_finite):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.optimizer_steps += 1
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params, strict=True):
                    e.lerp_(p.detach(), 1 - self.cfg.optim.ema)
        return True

    def update(self, batch: RolloutBatch, adv: Advantages) -> dict[str, float]:
        """One update on the batch: the GRPO loss on the stored SDE transitions
        (:func:`~mixgrpo.train.grpo_update.grpo_update`) or a forward-process objective on
        the clean samples (:func:`~mixgrpo.train.forward_update.forward_update`)."""
        return self.update_rule(self, batch, adv)

    @property
    def update_rule(self):
        return forward_update if self.cfg.loss.objective != "grpo" else grpo_update

    def _normalisation(self) -> dict[str, Any]:
        """How group advantages are normalised and clipped (``loss.*``), for one reward or several."""
        lc = self.cfg.loss
        return dict(std_mode=lc.std_mode, eps=lc.adv_eps, clip=lc.adv_clip, trimmed_ratio=lc.trimmed_ratio,
                    unbiased=lc.std_unbiased)

    def per_reward_advantages(self, rewards: dict[str, torch.Tensor], g: int, signal: torch.Tensor) -> list[Advantages]:
        """Each reward's own group advantages (``weighting.name=gradient``), in the weighting's order;
        ``signal`` replaces ``valid`` for forward-process objectives (they train every finite sample)."""
        lc = self.cfg.loss
        out = []
        for name in self.weighting.names:
            a = group_advantages(rewards[name], g, **self._normalisation())
            out.append(Advantages(a.advantages, signal if lc.objective != "grpo" else a.valid,
                                  a.num_zero_variance_groups))
        return out

    def step(self, iteration: int) -> dict[str, Any]:
        """One GRPO iteration; returns the metrics row."""
        start = time.perf_counter()
        batch = self.rollout(iteration)
        rewards = self.score(batch)
        bad, reasons = self.nonfinite_samples(batch, rewards)
        n_local = len(bad)
        if self.dist.enabled:  # every rank sees the whole batch's rewards, in group order
            rewards = {n: all_gather_rows(r, self.dist) for n, r in rewards.items()}
            bad = all_gather_rows(bad.to(torch.uint8), self.dist).bool()
        # a group with any non-finite member gets constant rewards: zero advantage, no update
        g = batch.group_size
        dropped = bad.view(-1, g).any(1).repeat_interleave(g)
        rewards = {n: r.masked_fill(dropped, 0.0) for n, r in rewards.items()}
        adv = self.advantages(rewards, g)
        weights = self.cfg.reward_weights
        total = sum(weights[n] * r for n, r in rewards.items()) / sum(weights.values())
        per_step = None
        if self.cfg.sampler.tree_splits:  # BranchGRPO: each edge its node's advantage within its depth
            steps = [batch.rollout.transitions.step_index[i] for i in batch.trained]
            current = self.weighting.weights()  # the static ones, or this iteration's dynamic ones
            combined = sum(current[n] * r for n, r in rewards.items()) / sum(current.values())
            per_step = tree_advantages(combined.view(-1, g), self.cfg.sampler.tree_splits, steps,
                                       clip=self.cfg.loss.adv_clip)[0]
        if self.cfg.loss.objective != "grpo" or per_step is not None:
            # the references train every finite sample: a constant group's at A = 0, every tree edge
            adv = Advantages(adv.advantages, ~dropped, adv.num_zero_variance_groups)
        mine = slice(self.dist.rank * n_local, (self.dist.rank + 1) * n_local)
        if self.weighting.needs_gradients:  # one gradient per reward, combined by their min-norm point
            local = [Advantages(a.advantages[mine], a.valid[mine], a.num_zero_variance_groups)
                     for a in self.per_reward_advantages(rewards, g, ~dropped)]
            stats = gradient_weighted_update(self, batch, local, self.update_rule)
        else:
            stats = self.update(batch, Advantages(adv.advantages[mine], adv.valid[mine], adv.num_zero_variance_groups,
                                                  per_step[mine] if per_step is not None else None))
        used = self.weighting.weights()  # the weights this iteration trained with
        if (~dropped).any():  # the next iterations' weights see this batch
            self.weighting.observe({n: r[~dropped].mean().item() for n, r in rewards.items()})
        # partial NaN/Inf only costs its groups; an iteration that taught nothing because of
        # them counts towards optim.max_nonfinite
        if stats["skipped_update"] or (bad.any() and dropped.all()):
            self.nonfinite_streak += 1
            reasons += ["non-finite loss or gradient (update skipped)"] if stats["skipped_update"] else []
            if self.nonfinite_streak >= self.cfg.optim.max_nonfinite:
                raise NonFiniteError(
                    f"stopped at iteration {iteration}: {self.nonfinite_streak} consecutive iterations with NaN/Inf "
                    f"({'; '.join(reasons)}); weights on disk are finite - fix the reward or lower optim.lr, then --resume"
                )
        else:
            self.nonfinite_streak = 0
        ok = ~dropped
        row = {
            "iteration": iteration,
            "reward_mean": total[ok].mean().item() if ok.any() else float("nan"),
            "reward_std": total[ok].std().item() if ok.sum() > 1 else float("nan"),
            **{f"reward_{n}": r[ok].mean().item() if ok.any() else float("nan") for n, r in rewards.items()},
            **({f"weight_{n}": w for n, w in used.items()} if len(used) > 1 else {}),
            **stats,
            "nonfinite_samples": int(bad.sum()),
            "window_start": self._first_loss_step(batch),
            "trained_steps": (batch.loss_times.shape[1] if batch.loss_times is not None
                              else int(batch.sample_mask().sum(1).max()) if batch.trained else 0),  # per sample
            "model_passes_per_image": self.measured_passes(batch),
            "zero_std_groups": adv.num_zero_variance_groups,
            "iter_time_s": time.perf_counter() - start,
        }
        return row

    def _first_loss_step(self, batch: RolloutBatch) -> int:
        """The noisiest grid step any sample trains this iteration."""
        if batch.loss_times is not None:
            return min(self.schedule.steps(batch.iteration))
        return min(batch.rollout.transitions.step_index[i] for i in batch.trained)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, *, seed: int = 0) -> tuple[dict[str, Any], torch.Tensor]:
        """The evaluation prompts (``eval_split``: held-out by default), one deterministic ODE
        sample each, scored by every training reward plus the backend's evaluation rewards
        (``reward_<name>``; ``exact_<name>`` = share of images scoring 1 for its exact rewards;
        ``split``). Returns the row and the images."""
        self.model.eval()
        s = self.cfg.sampler
        with self.autocast:
            images = generate_prompts(self.model, self.backend.condition, self.eval_prompts, seed=seed,
                                      steps=self.cfg.eval_steps or s.num_steps, shift=s.shift, guidance=s.guidance, decode=self.backend.decode,
                                      device=self.device)
        names = dict.fromkeys([*self.cfg.rewards, *self.backend.eval_rewards])
        finite = torch.isfinite(images).flatten(1).all(1)
        clean = torch.nan_to_num(images, nan=0.0)
        rewards = {n: score(self.rewards.get(n) or get_reward(n), clean, self.eval_prompts, allow_nonfinite=True)
                   for n in names}
        weights = self.cfg.reward_weights
        total = sum(weights[n] * rewards[n] for n in weights) / sum(weights.values())
        # means over the images every reward could score; `nonfinite` says how many could not
        ok = finite & torch.stack([torch.isfinite(r) for r in rewards.values()]).all(0)
        row = {"reward_mean": total[ok].mean().item(), **{f"reward_{n}": r[ok].mean().item() for n, r in rewards.items()},
               **{f"exact_{n}": (rewards[n][ok] == 1).float().mean().item() for n in self.backend.exact_rewards},
               "n": len(self.eval_prompts), "nonfinite": int((~ok).sum()), "split": self.cfg.eval_split}
        return row, images

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trained parameters (and their EMA as ``ema.<name>``), for checkpoints; whole tensors
        on the CPU (with FSDP a collective: every rank must call it)."""
        def whole(t: torch.Tensor) -> torch.Tensor:
            return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()

        state = {n: whole(p) for n, p in zip(self.param_names, self.params, strict=True)}
        if self.ema is not None:
            state.update({f"ema.{n}": whole(e) for n, e in zip(self.param_names, self.ema, strict=True)})
        if self.old is not None:
            state.update({f"old.{n}": whole(e) for n, e in zip(self.param_names, self.old.tensors, strict=True)})
        state["state.optimizer_steps"] = torch.tensor(self.optimizer_steps, dtype=torch.int64)
        state.update(self.weighting.state_dict())
        return state

    def ema_by_name(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema is None else dict(zip(self.param_names, self.ema, strict=True))

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, (name, p) in enumerate(zip(self.param_names, self.params, strict=True)):
                p.copy_(state[name])
                if self.ema is not None:
                    self.ema[i].copy_(state[f"ema.{name}"])
                if self.old is not None:
                    self.old.tensors[i].copy_(state[f"old.{name}"])
        # checkpoints written before the count was kept hold no old policy either: it only feeds its decay
        self.optimizer_steps = int(state["state.optimizer_steps"]) if "state.optimizer_steps" in state else 0
        if self.cfg.weighting.name != "static" or any(k.startswith("state.weighting.") for k in state):
            self.weighting.load_state_dict(state)

    def write_metrics(self, path: Path, row: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

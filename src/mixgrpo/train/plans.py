"""What a config samples and trains at an iteration, and what that costs in model passes.

The trainer builds its plans here, and the model-pass table of the methods is derived from
the presets through the same function, so neither keeps its own copy of a method's steps.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.accounting import ModelPasses, count_model_passes
from ..core.grids import uniform_grid
from ..core.sampler import SamplingPlan, flash_plan, mixed_plan
from ..core.tree import nodes_per_tree
from ..core.windows import WindowSchedule
from .config import TrainConfig
from .presets import PRESETS, make_preset

__all__ = ["config_model_passes", "make_schedule", "preset_model_passes", "sampling_plan"]


def make_schedule(cfg: TrainConfig) -> WindowSchedule:
    """The config's schedule of trained steps (seeded by ``cfg.seed``)."""
    return WindowSchedule(num_steps=cfg.sampler.num_steps, seed=cfg.seed, **dataclasses.asdict(cfg.schedule))


def sampling_plan(
    cfg: TrainConfig, schedule: WindowSchedule, grid: torch.Tensor, iteration: int, *, model_grid: bool = False
) -> tuple[SamplingPlan, tuple[int, ...]]:
    """The sampling plan and the trained step indices (of the training grid) at ``iteration``;
    ``cfg.sampler.shift`` must be a number. ``model_grid``: ``grid`` is the model's own (a VP
    model's DDIM times), not ``uniform_grid(num_steps, shift)``; Flash then interpolates its tail."""
    s = cfg.sampler
    trained = schedule.steps(iteration)
    if s.sde_on == "none":  # forward-process objectives: a deterministic sampler, the schedule picks loss times
        return mixed_plan(grid, (), s.ode_solver), trained
    if s.sde_on == "all":
        return mixed_plan(grid, range(s.num_steps - 1), s.ode_solver), trained
    if s.flash_compression is not None:
        return flash_plan(s.num_steps, trained, s.flash_compression, s.shift, s.dpm_order,
                          grid=grid if model_grid else None), trained
    return mixed_plan(grid, trained, s.ode_solver), trained


def config_model_passes(cfg: TrainConfig, iteration: int = 0) -> ModelPasses:
    """Planned passes per trained image: the plan's steps, each sample's trained steps (per
    inner epoch), the reference passes of a KL term. Shared prefixes and pruning save passes
    that only the trainer's measured ``model_passes_per_image`` sees."""
    schedule = make_schedule(cfg)
    plan, trained = sampling_plan(cfg, schedule, uniform_grid(cfg.sampler.num_steps, shift=cfg.sampler.shift),
                                  iteration)
    per_sample = schedule.subset_size if schedule.sampled_per_sample else len(trained)
    one = count_model_passes(plan, per_sample, cfg=cfg.sampler.guidance != 1.0, kl=cfg.loss.kl_beta > 0,
                             old=cfg.loss.uses_old_policy, forward=cfg.loss.objective != "grpo")
    splits = cfg.sampler.tree_splits
    if splits:  # a tree's passes are its nodes: per step the nodes entering it, per trained edge one
        leaves, factor = cfg.group_size, 2 if cfg.sampler.guidance != 1.0 else 1
        sampling = sum(nodes_per_tree(splits, k - 1) for k in range(plan.num_steps)) * factor / leaves
        training = sum(nodes_per_tree(splits, k) for k in trained) * factor / leaves
        one = ModelPasses(sampling, training, training if cfg.loss.kl_beta > 0 else 0)
    epochs = cfg.optim.inner_epochs
    return ModelPasses(one.sampling, one.training * epochs, one.reference * epochs)


def preset_model_passes(num_steps: int = 25, shift: float = 3.0, iteration: int = 0) -> dict[str, ModelPasses]:
    """:func:`config_model_passes` of every preset on a ``num_steps`` grid with ``shift``; the
    forward-process presets (DiffusionNFT 10 steps, AWM 14) and BranchGRPO (20, its splits
    placed on it) keep their own grids."""
    out = {}
    for name in PRESETS:
        cfg = make_preset(name)
        if cfg.loss.objective == "grpo" and not cfg.sampler.tree_splits:
            cfg.sampler.num_steps = num_steps
        cfg.sampler.shift = shift
        out[name] = config_model_passes(cfg.validate(), iteration)
    return out

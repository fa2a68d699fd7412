"""Run several training configs side by side, interleaved, and record cost and reward.

Every arm (a preset or an ablation variant, times a seed) gets its own trainer on the same
model, prompts, group size and evaluation prompts. Iterations are interleaved round-robin,
the order rotating each round, so machine noise falls on every arm alike; timings are
compared only as ratios within one run.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..rewards import get_reward
from ..train.config import TrainConfig
from ..train.trainer import GRPOTrainer

__all__ = ["Arm", "ArmResult", "run_arms"]


@dataclass
class Arm:
    """One config to bench, under the label it gets in tables."""

    label: str
    config: TrainConfig


@dataclass
class ArmResult:
    label: str
    seed: int
    iter_times: list[float] = field(default_factory=list)
    model_passes: list[int] = field(default_factory=list)
    train_rewards: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None  # CUDA only: the most memory any of its iterations allocated
    # held-out evaluations: (completed iterations, training seconds so far, eval row)
    evals: list[tuple[int, float, dict[str, Any]]] = field(default_factory=list)

    @property
    def train_seconds(self) -> float:
        return sum(self.iter_times)


def eval_points(iterations: int, evals: int) -> list[int]:
    """``evals`` evenly spaced completed-iteration counts ending at ``iterations`` (plus 0)."""
    points = {round(iterations * k / evals) for k in range(1, evals + 1)}
    return sorted({0, *points})


def _evaluate(trainer: GRPOTrainer) -> dict[str, Any]:
    """The trainer's held-out row plus, on the embedded world, each prompt's ``composition``
    (``per_prompt``): arms share the seed, the prompts and the evaluation noise, so
    differences between arms can be paired prompt by prompt."""
    row, images = trainer.evaluate()
    if "composition" in trainer.backend.eval_rewards:
        row["per_prompt"] = get_reward("composition")(images, trainer.eval_prompts).tolist()
    return row


def run_arms(
    arms: list[Arm], seeds: list[int], iterations: int, *, evals: int = 4,
    on_progress: Callable[[str, int], None] | None = None,
) -> list[ArmResult]:
    """Train every ``arm x seed`` for ``iterations``, interleaved; evaluate at :func:`eval_points`."""
    jobs: list[tuple[ArmResult, GRPOTrainer]] = []
    for seed in seeds:
        for arm in arms:
            cfg = copy.deepcopy(arm.config)
            cfg.seed, cfg.iterations = seed, iterations
            jobs.append((ArmResult(arm.label, seed), GRPOTrainer(cfg.validate())))
    points = set(eval_points(iterations, evals))
    start_eval: dict[tuple, dict[str, Any]] = {}
    for result, trainer in jobs:
        # identical starting models and eval prompts share one starting evaluation
        key = (trainer.cfg.model.checkpoint, trainer.cfg.eval_prompts, json.dumps(trainer.cfg.rewards, sort_keys=True),
               trainer.cfg.sampler.num_steps, trainer.cfg.sampler.shift, trainer.cfg.sampler.guidance)
        if key not in start_eval:
            start_eval[key] = _evaluate(trainer)
        result.evals.append((0, 0.0, start_eval[key]))
    for iteration in range(iterations):
        shift = iteration % len(jobs)
        for result, trainer in jobs[shift:] + jobs[:shift]:
            cuda = trainer.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(trainer.device)
                torch.cuda.reset_peak_memory_stats(trainer.device)
            started = time.perf_counter()
            row = trainer.step(iteration)
            if cuda:
                torch.cuda.synchronize(trainer.device)
                peak = torch.cuda.max_memory_allocated(trainer.device)
                result.peak_memory_bytes = max(result.peak_memory_bytes or 0, peak)
            result.iter_times.append(time.perf_counter() - started)
            result.model_passes.append(row["model_passes_per_image"])
            result.train_rewards.append(row["reward_mean"])
            if iteration + 1 in points:
                result.evals.append((iteration + 1, result.train_seconds, _evaluate(trainer)))
            if on_progress is not None:
                on_progress(result.label, iteration)
    return [result for result, _ in jobs]

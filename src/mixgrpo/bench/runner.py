"""Run several training configs side by side, interleaved, and record cost and reward.

Every arm (a preset or an ablation variant, times a seed) gets its own trainer on the same
model, prompts, group size and evaluation prompts. Iterations are interleaved round-robin,
the order rotating each round, so machine noise falls on every arm alike; timings are
compared only as ratios within one run.

Resuming (``state_dir``): after a round (one iteration of every arm) the runner saves every
arm's weights, optimizer and results (verified checkpoints, then ``state.json`` naming the
round, replaced atomically) at each evaluation point, at least every ``save_every_s`` seconds,
and when stopped. The first Ctrl-C/SIGTERM finishes the round, saves it and raises
:class:`BenchInterrupted`; running again with the same ``state_dir`` continues from the saved
round, and every reward and evaluation comes out as in an uninterrupted run (only timings of
the two sessions differ).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..inference.verify import IntactCheckpoint, damage
from ..rewards import get_reward
from ..train.checkpointing import load_checkpoint, save_checkpoint
from ..train.config import TrainConfig
from ..train.run import stop_requests
from ..train.trainer import GRPOTrainer

__all__ = ["Arm", "ArmResult", "BenchInterrupted", "run_arms", "saved_round"]


class BenchInterrupted(Exception):
    """Ctrl-C/SIGTERM stopped the bench after saving a round; ``signum`` and the hint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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
    # evaluations (held-out, or the training prompts with eval_split=train): (completed iterations, training seconds so far, eval row)
    evals: list[tuple[int, float, dict[str, Any]]] = field(default_factory=list)

    @property
    def train_seconds(self) -> float:
        return sum(self.iter_times)


def eval_points(iterations: int, evals: int) -> list[int]:
    """``evals`` evenly spaced completed-iteration counts ending at ``iterations`` (plus 0)."""
    points = {round(iterations * k / evals) for k in range(1, evals + 1)}
    return sorted({0, *points})


def _evaluate(trainer: GRPOTrainer) -> dict[str, Any]:
    """The trainer's evaluation row plus, on the embedded world, each prompt's ``composition``
    (``per_prompt``): arms share the seed, the prompts and the evaluation noise, so
    differences between arms can be paired prompt by prompt."""
    row, images = trainer.evaluate()
    if "composition" in trainer.backend.eval_rewards:
        row["per_prompt"] = get_reward("composition")(images, trainer.eval_prompts).tolist()
    return row


def saved_round(state_dir: Path | None) -> dict[str, Any] | None:
    """The saved bench state in ``state_dir`` (``None`` when there is none)."""
    if state_dir is None or not (Path(state_dir) / "state.json").is_file():
        return None
    try:
        return json.loads((Path(state_dir) / "state.json").read_text())
    except ValueError as err:
        raise ValueError(f"{state_dir}/state.json is unreadable ({err}); delete {state_dir} to start the bench over") from None


def _save(state_dir: Path, round_: int, jobs: list[tuple[ArmResult, GRPOTrainer]], config: Any) -> None:
    for j, (_, trainer) in enumerate(jobs):
        save_checkpoint(state_dir / f"arm_{j:03d}", round_, trainer.trainable_state(), trainer.optimizer,
                        {"nonfinite_streak": trainer.nonfinite_streak}, keep=2)
    state = {"round": round_, "config": config, "results": [dataclasses.asdict(r) for r, _ in jobs]}
    tmp = state_dir / ".state.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / "state.json")


def _restore(state_dir: Path, state: dict[str, Any], jobs: list[tuple[ArmResult, GRPOTrainer]]) -> None:
    round_ = int(state["round"])
    if len(state["results"]) != len(jobs):
        raise ValueError(f"{state_dir} holds a different bench ({len(state['results'])} arms); delete it to start over")
    for j, ((result, trainer), saved) in enumerate(zip(jobs, state["results"], strict=True)):
        folder = state_dir / f"arm_{j:03d}" / f"iter_{round_:06d}"
        why = damage(folder)
        if why is not None:
            raise ValueError(f"bench state {folder} is damaged ({why}); delete {state_dir} to start the bench over")
        _, weights, extra = load_checkpoint(IntactCheckpoint(folder, json.loads((folder / "state.json").read_text())),
                                            trainer.optimizer)
        trainer.load_trainable_state(weights)
        trainer.nonfinite_streak = int(extra.get("nonfinite_streak", 0))
        for name, value in saved.items():
            setattr(result, name, [tuple(e) for e in value] if name == "evals" else value)


def run_arms(
    arms: list[Arm], seeds: list[int], iterations: int, *, evals: int = 4,
    on_progress: Callable[[str, int], None] | None = None,
    state_dir: Path | None = None, save_every_s: float = 300.0, config: Any = None,
) -> list[ArmResult]:
    """Train every ``arm x seed`` for ``iterations``, interleaved; evaluate at :func:`eval_points`.
    With ``state_dir``, save rounds there and continue from the one saved (module doc)."""
    jobs: list[tuple[ArmResult, GRPOTrainer]] = []
    for seed in seeds:
        for arm in arms:
            cfg = copy.deepcopy(arm.config)
            cfg.seed, cfg.iterations = seed, iterations
            jobs.append((ArmResult(arm.label, seed), GRPOTrainer(cfg.validate())))
    points = set(eval_points(iterations, evals))
    saved = saved_round(state_dir)
    if saved is not None:
        _restore(Path(state_dir), saved, jobs)
        first = int(saved["round"]) + 1
        if on_progress is not None:
            for iteration in range(first):
                for result, _ in jobs:
                    on_progress(result.label, iteration)
    else:
        first = 0
        _start_evaluations(jobs)
    if state_dir is not None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    last_save = time.monotonic()
    with stop_requests() as stop:
        for iteration in range(first, iterations):
            _round(jobs, iteration, points, on_progress)
            if state_dir is None:
                continue
            due = iteration + 1 in points or time.monotonic() - last_save >= save_every_s
            if (due or stop["signum"] is not None) and iteration + 1 < iterations:
                _save(Path(state_dir), iteration, jobs, config)
                last_save = time.monotonic()
            if stop["signum"] is not None and iteration + 1 < iterations:
                name = signal.Signals(stop["signum"]).name
                raise BenchInterrupted(f"{name}: bench stopped after iteration {iteration + 1} of {iterations} with "
                                       "its state saved; run the same command again to continue", stop["signum"])
    return [result for result, _ in jobs]


def _start_evaluations(jobs: list[tuple[ArmResult, GRPOTrainer]]) -> None:
    start_eval: dict[tuple, dict[str, Any]] = {}
    for result, trainer in jobs:
        # identical starting models and eval prompts share one starting evaluation
        key = (trainer.cfg.model.checkpoint, trainer.cfg.eval_prompts, json.dumps(trainer.cfg.rewards, sort_keys=True),
               trainer.cfg.eval_steps or trainer.cfg.sampler.num_steps, trainer.cfg.sampler.shift,
               trainer.cfg.sampler.guidance)
        if key not in start_eval:
            start_eval[key] = _evaluate(trainer)
        result.evals.append((0, 0.0, start_eval[key]))


def _round(jobs: list[tuple[ArmResult, GRPOTrainer]], iteration: int, points: set[int],
           on_progress: Callable[[str, int], None] | None) -> None:
    """One iteration of every arm, the order rotating each round."""
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

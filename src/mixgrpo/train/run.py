"""A training run on disk: the directory layout, logging, evaluation cadence, resume.

    DIR/config.yaml        the resolved config
    DIR/metrics.jsonl      one row per iteration
    DIR/eval.jsonl         evaluation (`eval_split`: held-out, or the training prompts) at start,
                           every `eval_every`, at the end; its `iteration` counts completed
                           iterations (0 = before training)
    DIR/train_prompts.jsonl  the prompts it trains on (`mixgrpo eval --prompts` reads it)
    DIR/samples/           image grids of the evaluation prompts
    DIR/reward_curve.png   train reward against iteration
    DIR/eval_curve.png     evaluation reward against iteration
    DIR/weights_curve.png  with several rewards: each one's weight against iteration
    DIR/checkpoints/       atomic checkpoints + latest.json
    DIR/tb/                TensorBoard events
    DIR/summary.json       the headline figures
    DIR/failure.log        the traceback of a run that stopped on an error (see below)

A run that fails mid-way (a reward plug-in that raises or returns the wrong shape, a
checkpoint write that fails, NaN/Inf for too long) raises :class:`TrainingFailed` with one
line saying what happened and how to go on; the last good checkpoint and the metrics rows up
to it stay as they were, and ``--resume`` continues exactly where that checkpoint left off
(bitwise). Iterations of a NaN/Inf streak are not checkpointed (unless the run is stopped
there), so a resume after fixing the reward redoes them.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..inference.verify import checkpoint_folders, newest_intact
from ..viz import save_curve, save_image_grid
from .batch import NonFiniteError
from .checkpointing import load_checkpoint, load_resumable, save_checkpoint
from .config import EVAL_SPLITS, TrainConfig, config_from_dict, config_to_dict
from .distributed import (
    barrier,
    check_distributed_config,
    dist_from_environment,
    elastic_restart_count,
    sum_over_ranks,
)
from .fsdp import load_sharded, save_sharded
from .trainer import GRPOTrainer

__all__ = ["TrainingFailed", "TrainingInterrupted", "check_run_dir", "prepare_run_dir", "stop_requests", "train"]


class TrainingFailed(RuntimeError):
    """The run stopped on an error; the message (one line) says what and how to resume."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after a checkpoint; ``signum`` and the resume hint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextmanager
def stop_requests() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGTERM/SIGINT into a flag the loop checks between iterations (the
    current iteration finishes and is checkpointed); a second signal acts at once."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request(signum, _frame):
        flag["signum"] = signum
        signal.signal(signum, previous[signum])

    for sig in previous:
        signal.signal(sig, request)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse, before any work, a new run over an existing one or a resume without a run."""
    out = Path(out)
    if resume:
        if not (out / "config.yaml").is_file():
            raise ValueError(f"--resume: {out} holds no run (config.yaml missing); drop --resume to start one")
        if not checkpoint_folders(out / "checkpoints"):
            raise ValueError(f"--resume: {out} has no checkpoint yet; delete the folder or drop --resume to restart")
        newest_intact(out / "checkpoints")  # every checkpoint damaged: one line now, before any work
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def prepare_run_dir(out: Path, cfg: TrainConfig, resume: bool) -> TrainConfig:
    """Create ``out`` for a new run, or read its config for ``--resume``; never overwrites a run."""
    check_run_dir(out, resume)
    config_path = out / "config.yaml"
    if resume:
        return config_from_dict(yaml.safe_load(config_path.read_text())).validate()
    try:
        out.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    except OSError as err:
        raise ValueError(f"cannot write to output folder {out} ({err.strerror}); choose a writable --out") from None
    return cfg


def _truncate_jsonl(path: Path, last_iteration: int) -> list[dict[str, Any]]:
    """Drop rows after the checkpoint being resumed (they will be recomputed)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["iteration"] <= last_iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def train(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False,
    on_iteration: Callable[[dict[str, Any]], None] | None = None, trainer: GRPOTrainer | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training job in ``out``; returns the summary.

    Under torchrun every rank trains its share of the groups (see :mod:`.distributed`); rank 0
    alone evaluates and writes logs, images and checkpoints (the weights are the same on all
    ranks), and returns the summary (the others return ``{}``)."""
    out = Path(out)
    d = trainer.dist if trainer is not None else dist_from_environment(cfg.model.device)
    check_distributed_config(cfg, d)
    fresh_restart = False
    if elastic_restart_count() > 0 and not resume:  # torchrun restarted the workers after a failure
        resume = bool(checkpoint_folders(out / "checkpoints"))
        fresh_restart = not resume and (out / "config.yaml").is_file()  # it failed before its first checkpoint
    if not fresh_restart:
        check_run_dir(out, resume)
    barrier(d)  # every rank has checked the folder before rank 0 writes to it
    if d.is_main and fresh_restart:
        for log in ("metrics.jsonl", "eval.jsonl"):  # rows of the failed attempt are recomputed
            _truncate_jsonl(out / log, -1)
    elif d.is_main:
        cfg = prepare_run_dir(out, cfg, resume)
    barrier(d)
    if resume and not d.is_main:
        cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text())).validate()
    trainer = trainer or GRPOTrainer(cfg, dist=d)
    if d.is_main:
        (out / "train_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in trainer.train_prompts))
    metrics_path, eval_path = out / "metrics.jsonl", out / "eval.jsonl"
    start_iteration, elapsed_before = 0, 0.0
    if resume:
        found = load_resumable(out / "checkpoints")  # verified: a damaged newest one is skipped, and said so
        if d.is_main and found.note():
            print(found.note(), file=sys.stderr, flush=True)
        state = found.state
        if "dcp" in state:  # FSDP shards: any world size can read them
            load_sharded(out / "checkpoints" / state["dcp"], trainer.model, trainer.optimizer, trainer.ema_by_name())
        else:
            _, weights, state = load_checkpoint(found, trainer.optimizer)
            trainer.load_trainable_state(weights)
        last = found.iteration
        trainer.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        start_iteration, elapsed_before = last + 1, state.get("wall_time_s", 0.0)
        if d.is_main:
            _truncate_jsonl(metrics_path, last)  # rows are iteration indices
            _truncate_jsonl(eval_path, last + 1)  # rows count completed iterations
    last_good = start_iteration - 1  # the newest checkpoint on disk (-1: none yet)
    tb = _tensorboard(out / "tb") if d.is_main else None
    started = time.perf_counter()

    def evaluate(completed: int) -> None:
        """Held-out evaluation after ``completed`` iterations (0 = the starting model): rank 0
        only, except with FSDP, where every forward needs every rank."""
        if not (d.is_main or trainer.sharded):
            return
        row, images = trainer.evaluate()
        if not d.is_main:
            return
        row = {"iteration": completed, **row}
        trainer.write_metrics(eval_path, row)
        save_image_grid(out / "samples" / f"after_{completed:05d}.png", images[:16], trainer.eval_prompts[:16])
        if tb:
            for k, v in row.items():
                if k.startswith("reward"):
                    tb.add_scalar(f"eval/{k}", v, completed)

    def resume_hint() -> str:
        kept = f"the last good checkpoint is iter_{last_good:06d}" if last_good >= 0 else "no checkpoint was written yet"
        how = f"`mixgrpo train --out {out} --resume`" if last_good >= 0 else f"delete {out} and start again"
        return f"{kept} (metrics rows after it are redone); fix the cause, then {how}"

    def checkpoint(iteration: int) -> None:
        """Rank 0 writes the checkpoint; with FSDP every rank first writes its shards. A failed
        write (any rank) stops every rank with :class:`TrainingFailed`; earlier checkpoints stay."""
        nonlocal last_good
        extra = {"wall_time_s": elapsed_before + time.perf_counter() - started,
                 "nonfinite_streak": trainer.nonfinite_streak}
        error: BaseException | None = None
        try:
            if trainer.sharded:
                shards = f"iter_{iteration:06d}.dcp"
                save_sharded(out / "checkpoints" / shards, trainer.model, trainer.optimizer, trainer.ema_by_name())
                weights = trainer.trainable_state()  # a collective too
                if d.is_main:
                    save_checkpoint(out / "checkpoints", iteration, weights, None, {**extra, "dcp": shards},
                                    cfg.keep_checkpoints)
            elif d.is_main:
                save_checkpoint(out / "checkpoints", iteration, trainer.trainable_state(), trainer.optimizer, extra,
                                cfg.keep_checkpoints)
        except (OSError, ValueError, RuntimeError) as err:
            error = err
        # every rank learns whether the write failed, so none waits for a rank that stopped
        if sum_over_ranks(float(error is not None), d) > 0:
            why = f"{type(error).__name__}: {error}" if error is not None else "another rank's write failed"
            _log_failure(out, d, error)
            raise TrainingFailed(f"checkpoint at iteration {iteration} failed ({why}); {resume_hint()}") from error
        last_good = iteration

    try:
        with stop_requests() as stop:
            if start_iteration == 0:
                evaluate(0)
            for iteration in range(start_iteration, cfg.iterations):
                try:
                    row = trainer.step(iteration)
                except NonFiniteError as err:
                    _log_failure(out, d, err)
                    raise NonFiniteError(f"{str(err).split('; weights on disk')[0]}; {resume_hint()}") from err
                except Exception as err:  # a reward plug-in that raises, a wrong shape...
                    _log_failure(out, d, err)
                    raise TrainingFailed(f"iteration {iteration} failed ({type(err).__name__}: "
                                         f"{str(err).splitlines()[0] if str(err) else ''}); {resume_hint()}") from err
                if d.is_main:
                    trainer.write_metrics(metrics_path, row)
                if tb:
                    for k, v in row.items():
                        tb.add_scalar(f"train/{k}", v, iteration)
                if on_iteration is not None and d.is_main:
                    on_iteration(row)
                last = iteration == cfg.iterations - 1
                if (iteration + 1) % cfg.eval_every == 0 or last:
                    evaluate(iteration + 1)
                # ranks agree on a stop request, so none waits in a collective for the others
                if d.enabled and sum_over_ranks(float(stop["signum"] is not None), d) > 0 and stop["signum"] is None:
                    stop["signum"] = signal.SIGTERM
                periodic = (iteration + 1) % cfg.checkpoint_every == 0 and trainer.nonfinite_streak == 0
                if periodic or last or stop["signum"] is not None:
                    checkpoint(iteration)
                if stop["signum"] is not None and not last:
                    name = signal.Signals(stop["signum"]).name
                    raise TrainingInterrupted(
                        f"{name}: stopped after iteration {iteration} with a checkpoint; continue with "
                        f"`mixgrpo train --out {out} --resume`", stop["signum"])
    finally:
        if tb:
            tb.close()
    barrier(d)  # the last checkpoint is on disk before any rank leaves
    if not d.is_main:
        return {}
    return _summarise(out, cfg, trainer, elapsed_before + time.perf_counter() - started)


def _log_failure(out: Path, d, err: BaseException | None) -> None:
    """The full traceback goes to ``out/failure.log`` (rank 0); the user sees one line."""
    if err is None or not d.is_main:
        return
    try:
        with (out / "failure.log").open("a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.write("".join(traceback.format_exception(err)))
    except OSError:
        pass


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL logs still have everything
        return None
    return SummaryWriter(str(folder))


def _summarise(out: Path, cfg: TrainConfig, trainer: GRPOTrainer, wall: float) -> dict[str, Any]:
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines() if x.strip()]
    names = [k for k in evals[-1] if (k.startswith("reward_") and k != "reward_mean") or k.startswith("exact_")]
    summary = {
        "preset": cfg.preset,
        "iterations": cfg.iterations,
        "initial_eval_reward": evals[0]["reward_mean"],
        "final_eval_reward": evals[-1]["reward_mean"],
        # every reward the evaluation reported (the backend decides which), by name
        **{f"{when}_eval_{name.removeprefix('reward_')}": row.get(name) for name in names
           for when, row in (("initial", evals[0]), ("final", evals[-1]))},
        "eval_gain": evals[-1]["reward_mean"] - evals[0]["reward_mean"],
        "wall_time_s": round(wall, 1),
        "model_passes_per_image": sum(m["model_passes_per_image"] for m in metrics) / len(metrics),
        "mean_iter_time_s": sum(m["iter_time_s"] for m in metrics) / len(metrics),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_curve(out / "reward_curve.png", [m["iteration"] for m in metrics],
               {"train reward": [m["reward_mean"] for m in metrics]}, "iteration", "reward")
    weight_keys = [k for k in metrics[-1] if k.startswith("weight_")]
    if weight_keys:  # several rewards: the weight each had at every iteration
        save_curve(out / "weights_curve.png", [m["iteration"] for m in metrics],
                   {k.removeprefix("weight_"): [m.get(k, float("nan")) for m in metrics] for k in weight_keys},
                   "iteration", "reward weights")
    if len(evals) > 1:
        label = f"{EVAL_SPLITS[cfg.eval_split]} reward"
        save_curve(out / "eval_curve.png", [e["iteration"] for e in evals],
                   {label: [e["reward_mean"] for e in evals]}, "iteration", label)
    return summary

"""Crash safety: kill -9 and SIGTERM then --resume, NaN/Inf guards, atomic checkpoints."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.rewards import register_reward
from mixgrpo.train import checkpointing
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer, NonFiniteError
from tiny_runs import make_tiny_checkpoint, tiny_config


@register_reward("test-nan-first")
class NanForFirstImage:
    """Brightness, but NaN for the first image of every batch."""

    def __call__(self, images, prompts):
        r = images.mean(dim=(1, 2, 3))
        r[0] = float("nan")
        return r


@register_reward("test-nan-all")
class NanEverywhere:
    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), float("nan"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("rel") / "tiny")


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    index = (run / "checkpoints" / "latest.json").read_text()
    import json

    return load_file(str(run / "checkpoints" / json.loads(index)["path"] / "weights.safetensors"))


def _all_finite_on_disk(run: Path) -> bool:
    return all(torch.isfinite(t).all() for f in run.glob("checkpoints/iter_*/*.safetensors") for t in load_file(str(f)).values())


# ---------------------------------------------------------------------------- NaN / Inf
def test_nan_rewards_for_some_images_drop_their_group_and_training_goes_on(tiny_checkpoint, tmp_path):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "rewards={test-nan-first: 1.0}", "optim.lr=3e-3")
    trainer = GRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    train(cfg, tmp_path / "run", trainer=trainer)
    rows = [__import__("json").loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.iterations and all(r["nonfinite_samples"] == 1 for r in rows)
    assert all(r["skipped_update"] == 0 for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))  # it still learned
    assert _all_finite_on_disk(tmp_path / "run")


def test_all_nan_rewards_stop_the_run_with_a_message_and_finite_weights(tiny_checkpoint, tmp_path):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "rewards={test-nan-all: 1.0}", "optim.max_nonfinite=2",
                      "checkpoint_every=1")
    with pytest.raises(NonFiniteError, match=r"stopped at iteration 1: 2 consecutive .*reward 'test-nan-all' non-finite"):
        train(cfg, tmp_path / "run")
    assert _all_finite_on_disk(tmp_path / "run")


def test_a_model_emitting_inf_stops_the_run_and_never_saves_inf(tiny_checkpoint, tmp_path):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "optim.max_nonfinite=2", "checkpoint_every=1", "eval_every=100")
    trainer = GRPOTrainer(cfg)
    forward = trainer.model.forward
    trainer.model.forward = lambda *a, **k: forward(*a, **k) * float("inf")
    with pytest.raises(NonFiniteError, match="non-finite latent"):
        train(cfg, tmp_path / "run", trainer=trainer)
    assert _all_finite_on_disk(tmp_path / "run")


def test_a_nan_gradient_skips_the_update(tiny_checkpoint):
    trainer = GRPOTrainer(tiny_config(tiny_checkpoint, "mixgrpo"))
    forward = trainer.model.forward

    def nan_when_training(*args, **kwargs):
        v = forward(*args, **kwargs)
        return v * float("nan") if torch.is_grad_enabled() else v

    trainer.model.forward = nan_when_training
    before = [p.detach().clone() for p in trainer.params]
    row = trainer.step(0)
    assert row["skipped_update"] == 1.0 and trainer.nonfinite_streak == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


# ---------------------------------------------------------------------------- atomic checkpoints
def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_one_loadable(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "checkpoint_every=1", "iterations=3")
    trainer = GRPOTrainer(cfg)
    root = tmp_path / "ckpt"
    checkpointing.save_checkpoint(root, 0, trainer.trainable_state(), trainer.optimizer, {}, keep=2)
    real_replace = os.replace

    def crash_on_folder_rename(src, dst):
        if Path(src).is_dir():
            raise OSError("simulated power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", crash_on_folder_rename)
    with pytest.raises(OSError, match="power cut"):
        checkpointing.save_checkpoint(root, 1, trainer.trainable_state(), trainer.optimizer, {}, keep=2)
    monkeypatch.undo()
    assert checkpointing.latest_iteration(root) == 0
    iteration, _, _ = checkpointing.load_latest(root, trainer.optimizer)
    assert iteration == 0
    checkpointing.save_checkpoint(root, 1, trainer.trainable_state(), trainer.optimizer, {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000000", "iter_000001", "latest.json"]


# ---------------------------------------------------------------------------- real processes
def _cli(out: Path, ckpt: str, *extra: str) -> list[str]:
    sets = [f"model.checkpoint={ckpt}", "iterations=12", "prompts_per_iter=2", "group_size=4", "sampler.num_steps=8",
            "eval_prompts=4", "eval_every=100", "checkpoint_every=1", "keep_checkpoints=2", "schedule.interval=2",
            "schedule.size=2", "optim.micro_batch=8", "optim.lr=3e-3", "rewards={flatness: 1.0}"]
    return [sys.executable, "-m", "mixgrpo", "train", "--preset", "mixgrpo", "--out", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    done = _run(_cli(out, tiny_checkpoint))
    assert done.returncode == 0, done.stderr
    return _final_weights(out)


def _assert_bitwise(expected: dict, run: Path) -> None:
    got = _final_weights(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_sigterm_checkpoints_and_resume_finishes_bitwise(tiny_checkpoint, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, tiny_checkpoint), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: stopped after iteration" in stderr and "--resume" in stderr
    stopped_at = checkpointing.latest_iteration(out / "checkpoints")
    assert stopped_at is not None and stopped_at < 11
    resumed = _run(_cli(out, tiny_checkpoint, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    _assert_bitwise(uninterrupted, out)


def test_kill_9_at_random_moments_then_resume_is_bitwise(tiny_checkpoint, uninterrupted, tmp_path):
    out, rng, kills, resumed_from = tmp_path / "run", random.Random(0), 0, []
    while kills < 5:
        has_checkpoint = checkpointing.latest_iteration(out / "checkpoints") is not None
        if not has_checkpoint:
            shutil.rmtree(out, ignore_errors=True)  # killed before its first checkpoint: start again
        proc = subprocess.Popen(_cli(out, tiny_checkpoint, *(["--resume"] if has_checkpoint else [])),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # wait for training to be under way (metrics growing), then kill at a random moment
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:  # finished before the kill: start over so every kill counts
            assert proc.returncode == 0, proc.stderr.read()
            shutil.rmtree(out)
            continue
        proc.kill()
        proc.wait()
        kills += 1
        resumed_from.append(checkpointing.latest_iteration(out / "checkpoints"))
    assert any(i is not None for i in resumed_from), resumed_from  # some kills hit a run that had checkpoints
    has_checkpoint = checkpointing.latest_iteration(out / "checkpoints") is not None
    if not has_checkpoint:
        shutil.rmtree(out, ignore_errors=True)
    done = _run(_cli(out, tiny_checkpoint, *(["--resume"] if has_checkpoint else [])))  # a corrupt checkpoint fails here
    assert done.returncode == 0, done.stderr
    _assert_bitwise(uninterrupted, out)

"""Reliability v2: verified checkpoints, faults mid-run that keep the run, resumable eval and
bench. Every fault is followed by a resume that must end bitwise where an uninterrupted run
ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mixgrpo.cli import app
from mixgrpo.rewards import register_reward
from mixgrpo.train import checkpointing
from mixgrpo.train.config import config_to_dict
from mixgrpo.train.run import TrainingFailed, train
from mixgrpo.train.trainer import NonFiniteError
from tiny_runs import make_tiny_checkpoint, tiny_config

runner = CliRunner()

# what the faulty rewards do, set by each test: {"mode": ..., "from": first bad call, "calls": n}
FAULT: dict = {"mode": None}


@register_reward("test-faulty")
class Faulty:
    """Brightness, except while ``FAULT`` says otherwise: from training iteration ``from`` on
    (one call per iteration here; held-out evaluations score 3 images and are not counted)."""

    def __call__(self, images, prompts):
        r = images.mean(dim=(1, 2, 3))
        if images.shape[0] == 3:  # a held-out evaluation
            return r
        FAULT["calls"] = FAULT.get("calls", 0) + 1
        if FAULT["mode"] is None or FAULT["calls"] <= FAULT.get("from", 0):
            return r
        if FAULT["mode"] == "raise":
            raise RuntimeError("reward server unreachable")
        if FAULT["mode"] == "shape":
            return r[:1]
        if FAULT["mode"] == "nan":
            return torch.full_like(r, float("nan"))
        raise AssertionError(FAULT)


@pytest.fixture(autouse=True)
def _no_fault():
    FAULT.clear()
    FAULT["mode"] = None
    yield
    FAULT.clear()
    FAULT["mode"] = None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("faults") / "tiny")


def _cfg(tiny_checkpoint, *extra):
    return tiny_config(tiny_checkpoint, "mixgrpo", "rewards={test-faulty: 1.0}", "iterations=6", "checkpoint_every=1",
                       "keep_checkpoints=3", "eval_every=100", "eval_prompts=3", "optim.lr=3e-3", *extra)


def _latest_weights(run: Path) -> dict[str, torch.Tensor]:
    folder = checkpointing.newest_intact(run / "checkpoints").folder
    return load_file(str(folder / "weights.safetensors"))


def _bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(path: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def clean_run(tiny_checkpoint, tmp_path_factory):
    """The uninterrupted run every resumed one must end equal to."""
    out = tmp_path_factory.mktemp("clean") / "run"
    FAULT.clear()
    FAULT["mode"] = None
    train(_cfg(tiny_checkpoint), out)
    return out


# ---------------------------------------------------------------------------- verified checkpoints
def test_every_checkpoint_carries_checksums_of_its_files(clean_run):
    folder = checkpointing.newest_intact(clean_run / "checkpoints").folder
    sums = json.loads((folder / "state.json").read_text())["checksums"]
    assert set(sums) == {"weights.safetensors", "optimizer.safetensors"}
    from mixgrpo.inference.verify import file_sha256

    assert all(sums[name] == file_sha256(folder / name) for name in sums)


def test_resume_skips_a_damaged_newest_checkpoint_in_one_line_and_ends_bitwise(tiny_checkpoint, clean_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    newest = out / "checkpoints" / "iter_000005" / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a full disk
    before = _rows(out / "metrics.jsonl")
    result = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    line = ("checkpoint iter_000005 is damaged (weights.safetensors: checksum mismatch); resuming from iter_000004")
    assert line in " ".join(result.output.split())
    assert _rows(out / "metrics.jsonl") == before == list(range(6))  # iteration 5 redone, not doubled
    assert _bitwise(_latest_weights(out), _latest_weights(clean_run))


def test_every_checkpoint_damaged_is_one_line_not_a_traceback(clean_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    for f in (out / "checkpoints").glob("iter_*/weights.safetensors"):
        f.write_bytes(b"\0" * 16)
    result = runner.invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "no intact checkpoint is left" in text and text.count("is damaged") == 3


def test_keep_checkpoints_counts_only_intact_ones(tiny_checkpoint, tmp_path):
    from mixgrpo.train.trainer import GRPOTrainer

    trainer = GRPOTrainer(_cfg(tiny_checkpoint))
    root = tmp_path / "ckpt"

    def save(i):
        checkpointing.save_checkpoint(root, i, trainer.trainable_state(), trainer.optimizer, {}, keep=2)

    def names():
        return sorted(p.name for p in root.glob("iter_*"))

    save(0)
    save(1)
    (root / "iter_000001" / "optimizer.safetensors").write_bytes(b"garbage")
    save(2)  # 1 is damaged: 0 is still one of the two intact ones
    assert names() == ["iter_000000", "iter_000001", "iter_000002"]
    save(3)
    assert names() == ["iter_000002", "iter_000003"]


def test_sample_eval_and_export_use_the_newest_intact_checkpoint_and_say_so(clean_run, tmp_path):
    import shutil

    from mixgrpo.inference.policy import export_run, load_policy

    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    (out / "checkpoints" / "iter_000005" / "weights.safetensors").write_bytes(b"\0" * 64)
    notes = []
    policy = load_policy(out, on_note=notes.append)
    assert "iter_000004" in policy.source
    assert notes == ["checkpoint iter_000005 is damaged (weights.safetensors: checksum mismatch); using iter_000004"]
    result = runner.invoke(app, ["export", "--run", str(out), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert "iter_000005 is damaged" in " ".join(result.output.split())
    assert "iter_000004" in json.loads((tmp_path / "exported" / "config.json").read_text())["exported_from"]
    del export_run


# ---------------------------------------------------------------------------- faults mid-run
@pytest.mark.parametrize(("mode", "said"), [
    ("raise", "iteration 3 failed (RuntimeError: reward server unreachable)"),
    ("shape", "iteration 3 failed (ValueError: reward 'test-faulty' returned shape"),
])
def test_a_reward_that_fails_a_whole_batch_keeps_the_run_and_resume_is_bitwise(tiny_checkpoint, clean_run, tmp_path,
                                                                              mode, said):
    out = tmp_path / "run"
    FAULT.update(mode=mode, **{"from": 3})  # calls 1-3 = iterations 0-2 are fine
    with pytest.raises(TrainingFailed) as failed:
        train(_cfg(tiny_checkpoint), out)
    message = str(failed.value)
    assert said in message and "\n" not in message
    assert "the last good checkpoint is iter_000002 (metrics rows after it are redone)" in message
    assert f"`mixgrpo train --out {out} --resume`" in message
    assert _rows(out / "metrics.jsonl") == [0, 1, 2]
    assert "Traceback" in (out / "failure.log").read_text()
    FAULT["mode"] = None  # the reward is fixed
    train(_cfg(tiny_checkpoint), out, resume=True)
    assert _rows(out / "metrics.jsonl") == list(range(6))
    assert _bitwise(_latest_weights(out), _latest_weights(clean_run))


def test_the_cli_says_a_failed_run_in_one_line_and_exits_1(tiny_checkpoint, tmp_path):
    out, config = tmp_path / "run", tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(_cfg(tiny_checkpoint))))
    FAULT.update(mode="raise", **{"from": 1})
    result = runner.invoke(app, ["train", "--out", str(out), "--config", str(config)])
    assert result.exit_code == 1, result.output
    said = [x for x in result.output.splitlines() if "failed:" in x]
    assert len(said) == 1 and "Traceback" not in result.output, result.output
    assert "failed: iteration 1 failed (RuntimeError: reward server unreachable); the last good checkpoint is " \
           "iter_000000" in said[0]


def test_nan_for_whole_batches_stops_before_checkpointing_them_and_resume_is_bitwise(tiny_checkpoint, clean_run,
                                                                                      tmp_path):
    out = tmp_path / "run"
    FAULT.update(mode="nan", **{"from": 2})  # iterations 2, 3, 4 score NaN everywhere
    with pytest.raises(NonFiniteError) as failed:
        train(_cfg(tiny_checkpoint), out)
    message = str(failed.value)
    assert "stopped at iteration 4: 3 consecutive iterations" in message
    assert "the last good checkpoint is iter_000001" in message and "--resume" in message
    assert checkpointing.newest_intact(out / "checkpoints").iteration == 1  # none of the streak's iterations
    FAULT["mode"] = None
    train(_cfg(tiny_checkpoint), out, resume=True)
    assert _rows(out / "metrics.jsonl") == list(range(6))
    assert _bitwise(_latest_weights(out), _latest_weights(clean_run))


def test_a_failed_checkpoint_write_keeps_the_last_good_one_and_resume_is_bitwise(tiny_checkpoint, clean_run, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    real_save = checkpointing.save_file

    def disk_full_at_iteration_3(tensors, path):
        if "iter_000003" in path and path.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path)

    monkeypatch.setattr(checkpointing, "save_file", disk_full_at_iteration_3)
    with pytest.raises(TrainingFailed) as failed:
        train(_cfg(tiny_checkpoint), out)
    monkeypatch.undo()
    message = str(failed.value)
    assert message.startswith("checkpoint at iteration 3 failed (OSError: [Errno 28] No space left on device)")
    assert "the last good checkpoint is iter_000002" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "iter_000000", "iter_000001", "iter_000002", "latest.json"]  # no temporary folder left
    assert _rows(out / "metrics.jsonl") == [0, 1, 2, 3]  # row 3 is redone on resume
    train(_cfg(tiny_checkpoint), out, resume=True)
    assert _rows(out / "metrics.jsonl") == list(range(6))
    assert _bitwise(_latest_weights(out), _latest_weights(clean_run))


# ---------------------------------------------------------------------------- eval and bench resume
def _eval_args(tiny_checkpoint, out):
    return ["eval", "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--prompts", "heldout", "--limit", "150",
            "--rewards", "flatness", "--steps", "2", "--seeds", "2", "--blend", "0,0.5"]


def test_ctrl_c_during_eval_keeps_the_finished_parts_and_the_rerun_ends_bitwise(tiny_checkpoint, tmp_path, monkeypatch):
    from mixgrpo.inference import evaluate as E

    whole = runner.invoke(app, _eval_args(tiny_checkpoint, tmp_path / "whole.json"))
    assert whole.exit_code == 0, whole.output
    real, calls, stop_at = E.generate_prompts, [], [5]

    def ctrl_c_on_the_fifth_part(*args, **kwargs):
        calls.append(1)
        if len(calls) in stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "generate_prompts", ctrl_c_on_the_fifth_part)
    out = tmp_path / "eval.json"
    stopped = runner.invoke(app, _eval_args(tiny_checkpoint, out))
    assert stopped.exit_code == 130, stopped.output
    text = " ".join(stopped.output.split())
    assert "interrupted: eval stopped after 214 of 600 images" in text and "run the same command again" in text
    assert not out.exists() and (tmp_path / "eval.json.partial").is_file()
    calls.clear()
    stop_at.clear()
    resumed = runner.invoke(app, _eval_args(tiny_checkpoint, out))
    assert resumed.exit_code == 0, resumed.output
    assert "continuing the interrupted evaluation" in " ".join(resumed.output.split())
    assert len(calls) == 12 - 4  # 2 policies-blends x 2 seeds x 3 chunks, 4 done before
    assert json.loads(out.read_text()) == json.loads((tmp_path / "whole.json").read_text())
    assert not (tmp_path / "eval.json.partial").exists()


def test_an_interrupted_bench_continues_where_it_stopped_and_ends_like_an_uninterrupted_one(tiny_checkpoint, tmp_path):
    from mixgrpo.bench.runner import Arm, BenchInterrupted, run_arms

    arms = [Arm("a", tiny_config(tiny_checkpoint, "mixgrpo", "eval_prompts=4")),
            Arm("b", tiny_config(tiny_checkpoint, "flow-grpo", "eval_prompts=4"))]
    whole = run_arms(arms, [0], 4, evals=2)

    def stop_in_round_0(label, iteration):
        if iteration == 0 and label == "a":
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C: the round finishes and is saved

    state = tmp_path / "state"
    with pytest.raises(BenchInterrupted, match="SIGINT: bench stopped after iteration 1 of 4"):
        run_arms(arms, [0], 4, evals=2, state_dir=state, on_progress=stop_in_round_0)
    assert json.loads((state / "state.json").read_text())["round"] == 0
    steps = []
    resumed = run_arms(arms, [0], 4, evals=2, state_dir=state, on_progress=lambda label, i: steps.append(i))
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]  # the saved rounds count, then the rest runs
    for a, b in zip(whole, resumed, strict=True):
        assert a.train_rewards == b.train_rewards and a.model_passes == b.model_passes
        assert [(i, row) for i, _, row in a.evals] == [(i, row) for i, _, row in b.evals]
        assert len(b.iter_times) == 4


# ---------------------------------------------------------------------------- SIGTERM under torchrun
def _torchrun(out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mixgrpo",
            "train", "--out", str(out), "--config", str(config), *extra]


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_and_resume_is_bitwise(tiny_checkpoint, tmp_path):
    import uuid

    from test_distributed import _kill_everything

    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "sampler.noise_per_group=true", "iterations=8", "eval_every=100",
                      "checkpoint_every=100", "eval_prompts=4", "rewards={flatness: 1.0}")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(_torchrun(tmp_path / "whole", config), capture_output=True, text=True, env=env, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out, tag = tmp_path / "run", uuid.uuid4().hex
    proc = subprocess.Popen(_torchrun(out, config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**env, "MIXGRPO_TEST_TAG": tag})
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to its workers
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_everything(proc, tag)
    assert proc.returncode != 0
    assert "SIGTERM: stopped after iteration" in err and f"mixgrpo train --out {out} --resume" in err, err[-3000:]
    stopped = checkpointing.newest_intact(out / "checkpoints").iteration
    assert stopped < 7 and _rows(out / "metrics.jsonl") == list(range(stopped + 1))
    resumed = subprocess.run(_torchrun(out, config, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rows(out / "metrics.jsonl") == list(range(8))
    assert _bitwise(_latest_weights(out), _latest_weights(tmp_path / "whole"))


def test_the_same_bench_command_continues_an_interrupted_bench_and_nothing_else_does(tmp_path):
    from mixgrpo.bench import plan_bench

    out = tmp_path / "bench"
    plan = plan_bench(out, presets=["mixgrpo", "dance-grpo"], quick=True)
    assert not plan.resume
    plan.state_dir.mkdir(parents=True)
    (plan.state_dir / "state.json").write_text(json.dumps({"round": 3, "config": plan.config, "results": []}))
    assert plan_bench(out, presets=["mixgrpo", "dance-grpo"], quick=True).resume  # the same command
    with pytest.raises(ValueError, match="is not empty"):  # another bench never overwrites it
        plan_bench(out, presets=["mixgrpo"], quick=True)

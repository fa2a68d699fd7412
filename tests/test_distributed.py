"""torchrun data parallelism on the CPU (gloo): 2 processes reproduce 1 process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixgrpo.train.config import config_to_dict
from tiny_runs import make_tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = tiny_config(make_tiny_checkpoint(root / "tiny"), "mixgrpo", "sampler.noise_per_group=true", "iterations=2",
                      "eval_every=2", "checkpoint_every=2", "eval_prompts=4", "rewards={flatness: 1.0}")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def _torchrun(nproc: int, out, config, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mixgrpo", "train", "--out", str(out), "--config", str(config), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (from /proc: no pgrep needed)."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``MIXGRPO_TEST_TAG=tag`` (from /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"MIXGRPO_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _kill_everything(proc: subprocess.Popen, tag: str) -> None:
    """SIGKILL torchrun's process group and every process started with ``tag`` (workers that
    torchrun put in sessions of their own, even once orphaned), then reap torchrun."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in _tagged(tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _weights(run):
    return load_file(str(run / "checkpoints" / "iter_000001" / "weights.safetensors"))


EMA = ("--set", "optim.ema=0.9")  # the reference run also keeps an EMA, so the FSDP test can compare against it


@pytest.fixture(scope="module")
def one_process_run(config_file, tmp_path_factory):
    """The single-process reference that the DDP and FSDP runs must reproduce (run once)."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = _torchrun(1, out, config_file, *EMA)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_two_processes_train_like_one(config_file, one_process_run, tmp_path):
    two = _torchrun(2, tmp_path / "two", config_file, *EMA)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _weights(one_process_run), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 3e-8  # measured 1.5e-8: 1 float32 ulp
    start = _weights_at_start(config_file)
    assert any(not torch.equal(a[k], start[k]) for k in start)  # it did train
    # rank 0 alone logged: one metrics row per iteration, same rewards as the single process
    rows = [yaml.safe_load(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [yaml.safe_load(x) for x in (one_process_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["reward_mean"] for r in rows] == pytest.approx([r["reward_mean"] for r in ref], abs=1e-6)


def test_two_ranks_compute_the_single_process_gradient(config_file, tmp_path):
    """The first optimizer step's gradient (after DDP's all-reduce / FSDP's reduce-scatter,
    clipping off) equals the single process's, entry by entry, to 1e-6 of its largest entry
    (measured: 8.5e-8, float32 summation order). Adam's first step is nearly
    scale-free, so comparing weights cannot see a wrong loss normaliser; this can: a
    normaliser off by the world size doubles or halves every entry."""
    from dist_grad_probe import first_step_gradients
    from mixgrpo.train.config import apply_overrides, config_from_dict
    from mixgrpo.train.distributed import Dist

    overrides = ["optim.grad_clip=1e6"]  # clipping would rescale both sides to the same norm
    cfg = apply_overrides(config_from_dict(yaml.safe_load(config_file.read_text())), overrides)
    one = first_step_gradients(cfg, Dist())
    out = tmp_path / "grads.safetensors"
    probe = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(Path(__file__).parent / "dist_grad_probe.py"), str(config_file), str(out), *overrides]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    both = load_file(str(out))
    largest = max(g.abs().max().item() for g in one.values())
    assert largest > 0
    for mode in ("ddp", "fsdp"):
        two = {k.removeprefix(f"{mode}/"): v for k, v in both.items() if k.startswith(f"{mode}/")}
        assert two.keys() == one.keys(), mode
        worst = max((two[k] - one[k]).abs().max().item() for k in one)
        assert worst <= 1e-6 * largest, f"{mode}: max |grad diff| {worst:.3g} vs largest entry {largest:.3g}"


GRADIENT_WEIGHTING = ("rewards={flatness: 1.0, composition: 1.0}", "weighting.name=gradient")


@pytest.mark.parametrize(("preset", "extra"), [
    pytest.param("nft", (), marks=pytest.mark.slow), pytest.param("awm", (), marks=pytest.mark.slow), pytest.param("branch-grpo", (), marks=pytest.mark.slow),
    # one gradient per reward, min-norm weights
    pytest.param("mixgrpo", (*GRADIENT_WEIGHTING, "optim.minibatches=1"), marks=pytest.mark.slow),
    # the second of 4 optimizer steps: each group's balanced slice, whichever rank holds the group
    ("mixgrpo", ("optim.minibatch_order=balance", "MIXGRPO_PROBE_STEP=1")),
])
def test_newer_methods_two_ranks_compute_the_single_process_gradient(tmp_path, preset, extra):
    """DiffusionNFT, AWM and BranchGRPO under DDP: the same first gradient as one process
    (re-noising draws by each sample's row in the whole batch; a tree by its group's
    stream; tree edges weigh 1 / all ranks' edges). FSDP keeps no old policy yet, so DDP only.
    The same for the gradient (MGDA) reward weighting, and for a later optimizer step of a
    rollout split into minibatches."""
    from dist_grad_probe import first_step_gradients
    from mixgrpo.train.distributed import Dist

    step = next((int(e.split("=")[1]) for e in extra if e.startswith("MIXGRPO_PROBE_STEP=")), 0)
    extra = [e for e in extra if not e.startswith("MIXGRPO_PROBE_STEP=")]
    cfg = tiny_config(make_tiny_checkpoint(tmp_path / "tiny"), preset, "sampler.noise_per_group=true",
                      "rewards={flatness: 1.0}", "optim.grad_clip=1e6", *extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    one = first_step_gradients(cfg, Dist(), step)
    out = tmp_path / "grads.safetensors"
    probe = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(Path(__file__).parent / "dist_grad_probe.py"), str(path), str(out)]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MIXGRPO_PROBE_MODES": "ddp",
                                 "MIXGRPO_PROBE_STEP": str(step)})
    assert result.returncode == 0, result.stderr[-3000:]
    two = {k.removeprefix("ddp/"): v for k, v in load_file(str(out)).items()}
    largest = max(g.abs().max().item() for g in one.values())
    assert two.keys() == one.keys() and largest > 0
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    # float32 summation order: measured below 1e-6 of the largest entry for nft / awm, 1.8e-6 for
    # branch-grpo (its edge terms cancel in sign); a wrong normaliser would be off by 50% or more
    assert worst <= 1e-5 * largest, f"max |grad diff| {worst:.3g} vs largest entry {largest:.3g}"


def _weights_at_start(config_file):
    from mixgrpo.models.checkpoint import load_embedded

    ckpt = yaml.safe_load(config_file.read_text())["model"]["checkpoint"]
    return {k: v for k, v in load_embedded(ckpt).state_dict().items()}


@pytest.mark.parametrize(("extra", "match"), [
    (["--set", "prompts_per_iter=3"], "not divisible by the 2 processes"),
    pytest.param(["--set", "sampler.noise_per_group=false"], "needs sampler.noise_per_group", marks=pytest.mark.slow),
])
def test_bad_distributed_setups_fail_on_every_rank_before_work(config_file, tmp_path, extra, match):
    result = _torchrun(2, tmp_path / "run", config_file, *extra)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count(match) >= 2  # both ranks said it
    assert not (tmp_path / "run").exists()


def test_missing_rendezvous_is_a_clear_error(config_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "mixgrpo", "train", "--out", str(tmp_path / "run"),
                             "--config", str(config_file)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "launch with torchrun" in result.stdout + result.stderr


def _restart_after_kill_9(config_file, out, iterations: int, checkpoint_every: int) -> None:
    """torchrun --max-restarts 1: kill -9 one worker after the first checkpoint; the group is
    restarted, resumes from that checkpoint by itself and completes every iteration once.

    torchrun runs in a session of its own, and its workers (which torchrun puts in sessions of
    their own) carry a tag in their environment: whatever happens (a failed assertion, a
    timeout), torchrun's process group and every tagged process are killed before the test
    returns, so no worker outlives it."""
    import signal
    import time
    import uuid

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "mixgrpo", "train", "--out", str(out), "--config", str(config_file),
           "--set", f"iterations={iterations}", "--set", f"checkpoint_every={checkpoint_every}",
           "--set", f"eval_every={iterations}"]
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MIXGRPO_TEST_TAG": tag})
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-20000:]
    finally:
        _kill_everything(proc, tag)
    assert "connectFullMesh" not in err
    iterations_logged = [yaml.safe_load(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert iterations_logged == list(range(iterations))  # rows after the checkpoint were redone, none is doubled
    assert yaml.safe_load((out / "checkpoints" / "latest.json").read_text())["iteration"] == iterations - 1
    assert "restart" in err.lower() or "Restarting" in err


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(config_file, tmp_path):
    """Six iterations, a checkpoint every two, kill -9 after the first (10 of 10 runs pass on
    2 cores since the restart attempt's store prefix, see mixgrpo.train.distributed)."""
    _restart_after_kill_9(config_file, tmp_path / "run", iterations=6, checkpoint_every=2)


# FSDP's gradient equals one process's in the default suite (test_two_ranks_compute_the_single_process_gradient);
# its end-to-end run, DCP shards and resharded resume are slow (~25 s)
@pytest.mark.slow
def test_fsdp_trains_checkpoints_and_resumes_also_on_one_process(config_file, one_process_run, tmp_path):
    """parallel=fsdp: 2 ranks with FSDP2-sharded weights train like one process, write DCP
    shards plus consolidated weights, and the run resumes from the shards on 2 ranks and on 1
    (resharded on load)."""
    two = _torchrun(2, tmp_path / "fsdp", config_file, "--set", "parallel=fsdp", *EMA)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(one_process_run), _weights(tmp_path / "fsdp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 3e-8  # measured 1.5e-8: 1 float32 ulp
    assert (tmp_path / "fsdp" / "checkpoints" / "iter_000001.dcp" / ".metadata").is_file()
    # two more iterations from the shards, on 2 ranks and on 1 (resharded on load)
    for nproc in (2, 1):
        run = tmp_path / f"resume{nproc}"
        import shutil

        shutil.copytree(tmp_path / "fsdp", run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["iterations"] = 4
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        result = _torchrun(nproc, run, config_file, "--resume")
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [yaml.safe_load(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert rows == [0, 1, 2, 3]
        assert (run / "checkpoints" / "iter_000003" / "weights.safetensors").is_file()


def test_a_rank_whose_groups_teach_nothing_still_joins_the_update(config_file, tmp_path):
    """Rank 1's reward is constant, so its groups have zero advantage and no loss term; it
    must still join DDP's gradient all-reduce (a zero-loss backward) instead of hanging."""
    (tmp_path / "rank_reward.py").write_text(
        "import torch, torch.distributed as dist\n\nclass RankZeroOnly:\n    name = 'rank-zero-only'\n\n"
        "    def __call__(self, images, prompts):\n"
        "        score = images.mean((1, 2, 3))\n"
        "        return score if dist.get_rank() == 0 else torch.zeros_like(score)\n")
    info = tmp_path / "rank_reward-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rank-reward\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mixgrpo.rewards]\nrank-zero-only = rank_reward:RankZeroOnly\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = _torchrun(2, tmp_path / "run", config_file, "--set", "rewards={rank-zero-only: 1.0}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    start = _weights_at_start(config_file)
    after = _weights(tmp_path / "run")
    assert any(not torch.equal(after[k], start[k]) for k in start)  # rank 0's groups did train


# ---------------------------------------------------------------- device choice (no GPU needed)
def _fake_torchrun(monkeypatch, rank, local_rank, world=2):
    """torchrun's environment with the CUDA and process-group calls recorded, not made."""
    import torch.distributed as tdist

    from mixgrpo.train import distributed as D

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", torch.device(dev))))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(D, "_attempt_store", lambda rank, world: None)  # no TCP store to reach
    return D, calls


@pytest.mark.parametrize(("device", "local_rank", "expected"), [
    ("cuda", 3, "cuda:3"),  # each rank takes its own GPU
    ("cuda:1", 3, "cuda:1"),  # an explicit index is kept
])
def test_each_rank_sets_its_own_gpu_before_nccl_starts(monkeypatch, device, local_rank, expected):
    D, calls = _fake_torchrun(monkeypatch, rank=5, local_rank=local_rank, world=8)
    d = D.dist_from_environment(device)
    assert (d.rank, d.world_size, d.local_rank, d.device) == (5, 8, local_rank, expected)
    assert calls == [("set_device", torch.device(expected)), ("init", "nccl")]  # set_device first


def test_cpu_ranks_use_gloo_and_touch_no_gpu(monkeypatch):
    D, calls = _fake_torchrun(monkeypatch, rank=1, local_rank=1)
    d = D.dist_from_environment("cpu")
    assert d.device == "cpu" and calls == [("init", "gloo")]


def test_collectives_run_on_the_ranks_device_not_cuda_0(monkeypatch):
    """NCCL: what all_gather_rows and sum_over_ranks send goes to ``Dist.device``."""
    import torch.distributed as tdist

    from mixgrpo.train import distributed as D

    moved = []

    class Tensor:  # stands in for a CPU tensor; records where it is sent
        def to(self, device):
            moved.append(torch.device(device))
            return self

    monkeypatch.setattr(tdist, "get_backend", lambda *a: "nccl")
    assert D._wire(Tensor(), D.Dist(2, 4, 2, "cuda:2")) is not None
    assert moved == [torch.device("cuda:2")]
    with pytest.raises(ValueError, match="runs NCCL collectives but its device is cpu"):
        D._wire(Tensor(), D.Dist(2, 4, 2, "cpu"))
    monkeypatch.setattr(tdist, "get_backend", lambda *a: "gloo")
    x = torch.ones(2)
    assert D._wire(x, D.Dist(0, 2, 0, "cpu")) is x  # gloo: CPU tensors as they are
    # the trainer's device rule agrees with the process's: cuda -> cuda:LOCAL_RANK
    assert D.rank_device("cuda", 6, 8) == torch.device("cuda:6")
    assert D.rank_device("cuda", 0, 1) == torch.device("cuda")  # one process: the current GPU


def test_eval_under_torchrun_shards_the_prompts_and_equals_one_process(tmp_path):
    """Two ranks each sample half of the eval's parts (chunk x seed pass); rank 0 writes the
    gathered result, which equals the single process's bitwise (a part's noise depends on its
    place in the whole evaluation, not on the rank)."""
    args = ["eval", "--checkpoint", make_tiny_checkpoint(tmp_path / "tiny"), "--prompts", "heldout", "--limit", "70", "--seeds", "2", "--steps", "3",
            "--rewards", "composition,flatness", "--blend", "0,0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mixgrpo", *args, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mixgrpo", *args, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a = json.loads((tmp_path / "one.json").read_text())["results"]
    b = json.loads((tmp_path / "two.json").read_text())["results"]
    assert len(a) == len(b) == 2 and a == b  # every mean, CI and per-prompt score
    assert not (tmp_path / "two.json.partial").exists()

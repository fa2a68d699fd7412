"""The GRPO trainer and `mixgrpo train` on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mixgrpo.cli import app
from mixgrpo.core.objective import step_loss
from mixgrpo.train.plans import config_model_passes
from mixgrpo.train.presets import PRESETS
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer
from tiny_runs import make_tiny_checkpoint, tiny_config, train_interrupted_then_resumed


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_ratio_is_exactly_one_before_the_first_update(tiny_checkpoint):
    trainer = GRPOTrainer(tiny_config(tiny_checkpoint, "mixgrpo", "optim.minibatches=1"))
    batch = trainer.rollout(0)
    stats = trainer.update(batch, trainer.advantages(trainer.score(batch)))
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0 and stats["approx_kl"] == 0.0


def _count_passes(trainer):
    """Wrap the policy's (and a reference copy's) forward to count grad and no-grad passes."""
    calls = {"grad": 0, "no_grad": 0}
    for module in filter(None, (trainer.model, trainer.reference)):
        def counting_forward(*args, _forward=module.forward, **kwargs):
            calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
            return _forward(*args, **kwargs)

        module.forward = counting_forward
    return calls


def _loss_terms(trainer, cfg, iteration, row):
    """(trained step, micro-batch) pairs with at least one sample training that step; the
    micro-batches split each optimizer step's part (every group's k-th slice)."""
    if row["zero_std_groups"] == cfg.prompts_per_iter:
        return 0
    assert row["zero_std_groups"] == 0, "the toy reward separates every group"
    _, trained = trainer.plan(iteration)
    n = cfg.prompts_per_iter * (cfg.sampler.prune_keep or cfg.group_size)
    mask = torch.as_tensor(trainer.schedule.sample_steps(iteration, range(n)))[:, list(trained)]
    if cfg.sampler.prune_keep is not None:  # rows survive pruning, each trains every trained step
        mask = torch.ones(n, len(trained), dtype=torch.bool)
    group = n // cfg.prompts_per_iter
    parts = [torch.cat([torch.arange(g, g + group).tensor_split(cfg.optim.minibatches)[k] for g in range(0, n, group)])
             for k in range(cfg.optim.minibatches)]
    return sum(int(mask[c].any(0).sum()) for p in parts for c in p.split(cfg.optim.micro_batch))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gradients_flow_only_through_trained_steps_and_passes_match_accounting(tiny_checkpoint, preset):
    cfg = tiny_config(tiny_checkpoint, preset, "loss.kl_beta=0.0")
    trainer = GRPOTrainer(cfg)
    calls = _count_passes(trainer)
    row = trainer.step(1)
    plan, trained = trainer.plan(1)
    if cfg.loss.objective != "grpo":  # forward-process loss: K times per sample, every sample trains
        k = trainer.schedule.subset_size if trainer.schedule.sampled_per_sample else len(trained)
        terms = k * -(-cfg.prompts_per_iter * cfg.group_size // cfg.optim.micro_batch)
        assert row["trained_steps"] == k and calls["grad"] == terms
        assert calls["no_grad"] == plan.num_steps + terms * cfg.loss.uses_old_policy  # + the old policy's passes
        assert row["model_passes_per_image"] == config_model_passes(trainer.cfg, 1).total
        return
    assert calls["grad"] == _loss_terms(trainer, cfg, 1, row)  # one grad pass per trained step and chunk
    assert calls["no_grad"] == plan.num_steps  # the rollout: one batched pass per plan step
    if not (cfg.sampler.shared_prefix or cfg.sampler.prune_offsets):  # branching: tests/test_branching.py
        assert row["model_passes_per_image"] == config_model_passes(trainer.cfg, 1).total
    per_sample = trainer.schedule.subset_size if cfg.schedule.per_sample else len(trained)
    assert row["trained_steps"] == per_sample


@pytest.mark.parametrize("lora", [0, 4])
def test_kl_reference_passes_are_counted(tiny_checkpoint, lora):
    """With KL on, every loss pass has a no-grad reference pass, and both the measured and
    the planned accounting include them (flow-grpo on 8 steps: 8 sampling + 7 loss + 7 reference)."""
    # one optimizer step per rollout, so that iteration 0's KL is all at the reference
    cfg = tiny_config(tiny_checkpoint, "flow-grpo", f"model.lora_rank={lora}", "optim.minibatches=1")
    assert cfg.loss.kl_beta > 0
    trainer = GRPOTrainer(cfg)
    assert trainer.step(0)["kl"] == 0.0  # the policy starts at the reference
    calls = _count_passes(trainer)
    row = trainer.step(1)
    plan, _ = trainer.plan(1)
    terms = _loss_terms(trainer, cfg, 1, row)
    assert terms > 0 and calls["grad"] == terms
    assert calls["no_grad"] == plan.num_steps + terms  # rollout + one reference pass per loss pass
    planned = config_model_passes(trainer.cfg, 1)
    assert (planned.sampling, planned.training, planned.reference) == (8, 7, 7)
    assert row["model_passes_per_image"] == planned.total == 22
    assert row["kl"] > 0  # one update later it has moved away


def test_per_sample_steps_loss_is_each_samples_mean_over_its_steps(tiny_checkpoint):
    """dance-grpo: every sample trains its own subset (DanceGRPO's per-sample randperm), and
    the loss is the mean over samples of the mean over that sample's trained steps, as the
    reference's ``loss / (accumulation * train_timesteps)`` summed over its samples."""
    cfg = tiny_config(tiny_checkpoint, "dance-grpo", "loss.clip_range=0.5", "optim.minibatches=1")
    trainer = GRPOTrainer(cfg)
    batch = trainer.rollout(0)
    mask = batch.sample_mask()
    assert mask.shape == (8, 7) and (mask.sum(1) == 4).all() and not (mask == mask[0]).all()
    tr = batch.rollout.transitions
    tr.log_prob += 0.01 * torch.randn(tr.log_prob.shape, generator=torch.Generator().manual_seed(0))  # ratio != 1
    adv = trainer.advantages(trainer.score(batch), batch.group_size)
    assert adv.valid.all()
    per = torch.zeros(mask.shape)
    with torch.no_grad():
        for j, s in enumerate(batch.trained):
            t, t_next = tr.t[s].item(), tr.t_next[s].item()
            v = trainer.velocity(tr.x[s], torch.full((8,), t), batch.cond)
            per[:, j] = step_loss(v, tr.x[s], tr.x_next[s], tr.log_prob[s], adv.advantages, t, t_next,
                                  trainer.noise, trainer.loss_spec)[0]
    expected = ((per * mask).sum(1) / mask.sum(1)).mean()
    assert trainer.update(batch, adv)["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_toy_reward_moves_samples_the_right_way(tiny_checkpoint):
    # one optimizer step per rollout: with the preset's 4, clip 1e-4 masks most of steps 2-4 here
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "optim.lr=6e-3", "optim.minibatches=1",
                      "iterations=12", "group_size=8", "sampler.noise_level=1.0", "schedule.size=4")
    trainer = GRPOTrainer(cfg)
    before = trainer.evaluate()[0]["reward_test-train-brightness"]
    for i in range(cfg.iterations):
        trainer.step(i)
    after = trainer.evaluate()[0]["reward_test-train-brightness"]
    assert after > before + 0.08, (before, after)  # measured +0.16; the old lr 3e-3 gave +0.020, at the bound


def test_train_cli_end_to_end_writes_every_output(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--preset", "mixgrpo"]
    for item in (f"model.checkpoint={tiny_checkpoint}", "iterations=3", "prompts_per_iter=2", "group_size=4",
                 "sampler.num_steps=8", "eval_prompts=8", "eval_every=2", "checkpoint_every=2", "schedule.interval=1"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "reward_curve.png", "summary.json",
                 "checkpoints/latest.json"):
        assert (out / name).is_file(), name
    assert list((out / "samples").glob("*.png")) and list((out / "tb").iterdir())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for key in ("iteration", "reward_mean", "reward_std", "reward_composition", "loss", "clip_frac", "approx_kl",
                "window_start", "model_passes_per_image", "iter_time_s", "zero_std_groups"):
        assert key in rows[0], key
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 2, 3]
    assert {"reward_mean", "reward_composition", "n"} <= set(evals[0])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("preset", "iterations", "initial_eval_reward", "final_eval_reward", "wall_time_s",
                "model_passes_per_image"):
        assert key in summary, key


@pytest.mark.parametrize("preset", ["mixgrpo", "nft", pytest.param("awm", marks=pytest.mark.slow)])  # + old policy
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_checkpoint, tmp_path, preset):
    cfg = tiny_config(tiny_checkpoint, preset)
    full = GRPOTrainer(cfg)
    train(cfg, tmp_path / "full", trainer=full)
    train_interrupted_then_resumed(cfg, tmp_path / "cut")  # iteration 1 was checkpointed; 2 is lost
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full/checkpoints/iter_000003/weights.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/iter_000003/weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x)["iteration"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]


def test_lora_trains_only_the_adapter(tiny_checkpoint):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "model.lora_rank=4", "loss.kl_beta=0.1")
    trainer = GRPOTrainer(cfg)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.step(0)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--preset", "mixgrp"], "unknown preset 'mixgrp'; did you mean 'mixgrpo'"),
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean optim.'lr'"),
        (["--set", "schedule.size=30"], "larger than the 24 trainable steps"),
        (["--set", "group_size=1"], "group_size must be >= 2"),
        (["--set", "optim.lr=fast"], "optim.lr must be float"),
        (["--set", "iterations"], "--set expects key=value"),
        (["--resume"], "holds no run"),
    ],
)
def test_bad_train_input_fails_with_one_clear_line(tmp_path, args, match):
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split())


def test_existing_run_is_never_overwritten(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--set", f"model.checkpoint={tiny_checkpoint}"])
    assert result.exit_code == 2 and "already holds a run" in " ".join(result.output.split())
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    blocked = tmp_path / "file"
    blocked.write_text("x")
    result = CliRunner().invoke(app, ["train", "--out", str(blocked / "sub"), "--set",
                                      f"model.checkpoint={tiny_checkpoint}"])
    assert result.exit_code == 2 and "choose a writable --out" in " ".join(result.output.split())


def test_bf16_autocast_and_ema(tiny_checkpoint):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "model.dtype=bfloat16", "optim.ema=0.9", "optim.lr=1e-3")
    trainer = GRPOTrainer(cfg)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    row = trainer.step(0)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if isinstance(v, float))
    state = trainer.trainable_state()
    name = "blocks.0.qkv.weight"
    # EMA lags the weights: it moved from the start, but only part of the way
    assert not torch.equal(state[name], start[name])
    ema_step = (state[f"ema.{name}"] - start[name]).abs().sum()
    assert 0 < ema_step < (state[name] - start[name]).abs().sum()


def test_nft_old_policy_lags_and_samples(tiny_checkpoint):
    """DiffusionNFT's old policy: after optimizer step n it is ``d theta_old + (1 - d) theta``
    with ``d = min(0.001 n, 0.5)``, and it (not the trained weights) draws the rollouts."""
    cfg = tiny_config(tiny_checkpoint, "nft", "optim.lr=1e-2")
    trainer = GRPOTrainer(cfg)
    start = [p.detach().clone() for p in trainer.params]
    trainer.step(0)
    trainer.step(1)
    assert trainer.optimizer_steps == 2
    theta = [p.detach().clone() for p in trainer.params]
    assert any(not torch.equal(a, b) for a, b in zip(start, theta, strict=True))
    # the old policy after step 1 (d = 0.001) is that step's weights, so recompute from the trace
    probe = GRPOTrainer(cfg)
    probe.step(0)
    after_first = [p.detach().clone() for p in probe.params]
    expected = [0.002 * (0.001 * s + 0.999 * a) + 0.998 * t for s, a, t in zip(start, after_first, theta, strict=True)]
    for old, e in zip(trainer.old.tensors, expected, strict=True):
        torch.testing.assert_close(old, e, rtol=0, atol=1e-7)
    sampled = trainer.rollout(2).rollout.x0
    current = GRPOTrainer(tiny_config(tiny_checkpoint, "nft", "sampler.rollout_policy=current", "loss.kl_beta=0.0"))
    with torch.no_grad():
        for p, old in zip(current.params, trainer.old.tensors, strict=True):
            p.copy_(old)
    torch.testing.assert_close(current.rollout(2).rollout.x0, sampled, rtol=0, atol=0)
    assert not torch.equal(trainer.rollout(2).rollout.x0, GRPOTrainer(cfg).rollout(2).rollout.x0)


@pytest.mark.parametrize(("preset", "extra"), [
    ("awm", ["schedule.name=progressive", "schedule.size=2"]),  # MixGRPO's sliding window picks AWM's loss times
    ("nft", ["sampler.num_steps=4", "sampler.ode_solver=dpm2"]),  # NFT on a few-step Flash-like sampler
    ("nft", ["sampler.sde_on=trained", "sampler.shared_noise=true", "schedule.name=progressive",
             "schedule.final_step=false", "schedule.per_sample=false"]),  # rollouts through MixGRPO's mixed ODE-SDE sampler
])
def test_forward_objectives_compose_with_windows_and_samplers(tiny_checkpoint, preset, extra):
    cfg = tiny_config(tiny_checkpoint, preset, *extra)
    trainer = GRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    row = trainer.step(0)
    steps = trainer.schedule.steps(0)
    assert row["trained_steps"] == (trainer.schedule.subset_size if trainer.schedule.sampled_per_sample else len(steps))
    assert row["model_passes_per_image"] == config_model_passes(trainer.cfg, 0).total
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))


def test_branch_grpo_loss_is_the_mean_over_tree_edges(tiny_checkpoint):
    """BranchGRPO: every edge of every tree once (its first leaf), with its node's per-depth
    advantage, all edges weighted equally (the reference's sum over edges / their count)."""
    from mixgrpo.core.grpo import Advantages
    from mixgrpo.core.tree import tree_advantages

    cfg = tiny_config(tiny_checkpoint, "branch-grpo", "loss.clip_range=0.5")
    trainer = GRPOTrainer(cfg)
    batch = trainer.rollout(0)
    tr = batch.rollout.transitions
    tr.log_prob += 0.01 * torch.randn(tr.log_prob.shape, generator=torch.Generator().manual_seed(0))  # ratio != 1
    rewards = torch.rand(8, generator=torch.Generator().manual_seed(1))
    steps = [tr.step_index[i] for i in batch.trained]
    per_step, mask = tree_advantages(rewards.view(2, 4), cfg.sampler.tree_splits, steps)
    assert torch.equal(mask, batch.sample_mask()) and int(mask.sum()) == 2 * (2 + 2 + 2 + 4 + 4 + 4 + 4)
    terms = []
    with torch.no_grad():
        for j, s in enumerate(batch.trained):
            t, t_next = tr.t[s].item(), tr.t_next[s].item()
            v = trainer.velocity(tr.x[s], torch.full((8,), t), batch.cond)
            per = step_loss(v, tr.x[s], tr.x_next[s], tr.log_prob[s], per_step[:, j], t, t_next, trainer.noise,
                            trainer.loss_spec)[0]
            terms.append(per[mask[:, j]])
    expected = torch.cat(terms).mean()
    adv = Advantages(torch.zeros(8), torch.ones(8, dtype=torch.bool), 0, per_step)
    scale = torch.cat(terms).abs().mean().item()  # terms of both signs cancel: float32 error on their size
    assert trainer.update(batch, adv)["loss"] == pytest.approx(expected.item(), abs=1e-5 * scale)

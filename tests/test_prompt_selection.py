"""``prompt_pool`` and ``eval_split``: which prompts a run trains on and which it evaluates on."""

from __future__ import annotations

import pytest

from mixgrpo.bench.report import markdown, summarise
from mixgrpo.bench.runner import ArmResult
from mixgrpo.train.backends import make_backend
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.trainer import GRPOTrainer
from mixgrpo.world import split_prompts
from tiny_runs import make_tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pool") / "tiny")


def test_pool_is_a_fixed_sample_of_the_training_prompts_in_their_order(tiny_checkpoint):
    train = split_prompts()[0]
    pool = make_backend(tiny_config(tiny_checkpoint, "mixgrpo", "prompt_pool=16")).train_prompts
    assert len(set(pool)) == 16 and pool == [p for p in train if p in set(pool)]
    # the same prompts for every seed and method, so bench arms and seeds stay paired
    assert make_backend(tiny_config(tiny_checkpoint, "awm", "prompt_pool=16", "seed=5")).train_prompts == pool
    assert make_backend(tiny_config(tiny_checkpoint, "mixgrpo")).train_prompts == train
    assert not set(make_backend(tiny_config(tiny_checkpoint, "mixgrpo", "prompt_pool=16")).eval_prompts) & set(train)


def test_training_split_evaluates_every_pool_prompt_evenly(tiny_checkpoint):
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "prompt_pool=16", "eval_split=train", "eval_prompts=40")
    trainer = GRPOTrainer(cfg)
    pool, evals = trainer.train_prompts, trainer.eval_prompts
    assert len(evals) == 40 and set(evals) == set(pool)
    assert {evals.count(p) for p in pool} == {2, 3}  # cycled: 40 = 2 x 16 + 8
    assert set(trainer.rollout(0).prompts) <= set(pool)
    row, _ = trainer.evaluate()
    assert row["split"] == "train" and row["n"] == 40


def test_bad_pools_and_splits_say_what_to_set(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"prompt_pool must be 0 .* >= prompts_per_iter"):
        tiny_config(tiny_checkpoint, "mixgrpo", "prompt_pool=1").validate()
    with pytest.raises(ValueError, match="eval_split must be heldout or train"):
        tiny_config(tiny_checkpoint, "mixgrpo", "eval_split=val").validate()
    with pytest.raises(ValueError, match="exceeds the 900 training prompts; lower it"):
        make_backend(apply_overrides(tiny_config(tiny_checkpoint), ["prompt_pool=5000"]))


def test_bench_report_names_the_split_it_measured():
    def result(split):
        r = ArmResult("dance-grpo", 0, iter_times=[1.0], model_passes=[10], train_rewards=[0.0])
        r.evals += [(0, 0.0, {"reward_mean": 0.3, "split": split}), (1, 1.0, {"reward_mean": 0.4, "split": split})]
        return r

    assert "| training-prompt reward |" in markdown(summarise([result("train")]), "t")
    held = markdown(summarise([result("heldout")]), "t")
    assert "| held-out reward |" in held and "training-prompt" not in held


def test_a_run_writes_the_prompts_it_trains_on_and_titles_its_split(tiny_checkpoint, tmp_path, monkeypatch):
    from mixgrpo.data import read_prompt_file
    from mixgrpo.train import run

    titles = {}
    monkeypatch.setattr(run, "save_curve", lambda path, x, curves, xlabel, title: titles.update({path.name: title}))
    cfg = tiny_config(tiny_checkpoint, "mixgrpo", "prompt_pool=16", "iterations=1", "eval_split=train")
    run.train(cfg, tmp_path / "run")
    pool = make_backend(cfg).train_prompts
    assert read_prompt_file(str(tmp_path / "run" / "train_prompts.jsonl")) == pool
    assert titles["eval_curve.png"] == "training-prompt reward"

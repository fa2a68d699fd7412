"""`mixgrpo eval` end to end with the paper's rewards on tiny FLUX and SD3 runs.

MixGRPO's Table 1 scores HPS-v2.1, PickScore, ImageReward and CLIP score (we add ``vlm-judge``).
Here every reward is a toy-size random checkpoint in its official layout (tests/tiny_rewards.py),
given to the CLI through ``--reward-options`` (YAML: reward name -> constructor options), and the
checkpoints are a 2-iteration LoRA run and its pipeline folder, for a tiny FLUX and a tiny SD3
(tests/tiny_pipelines.py), all offline on the CPU. Only the plumbing is checked (the table's
columns, finite statistics, blends and NFE), not the values: the reward models are random.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mixgrpo.cli import app
from mixgrpo.text.preprocess import preprocess_prompts
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.run import train
from tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd3_pipeline
from tiny_rewards import make_reward_checkpoints, reward_options

REWARDS = ["hps", "pickscore", "imagereward", "clipscore", "vlm-judge"]
TRAIN_PROMPTS = ["two red circles", "a photo of a cat", "one blue square"]
EVAL_PROMPTS = ["two red circles", "a photo of a cat", "three green triangle"]  # the last: in no embeddings folder
SIDE, STEPS = 16, 6
runner = CliRunner()


def train_tiny_run(kind: str, pipeline: Path, embeddings: Path, out: Path) -> Path:
    """A 2-iteration LoRA MixGRPO run on a tiny pipeline (flatness reward: any reward trains)."""
    extra = ["model.flux_guidance=3.5"] if kind == "flux" else []
    cfg = apply_overrides(make_preset("mixgrpo"), [
        f"model.kind={kind}", f"model.path={pipeline}", f"model.embeddings={embeddings}", f"model.image_size={SIDE}",
        "sampler.shift=scheduler", "iterations=2", "prompts_per_iter=2", "group_size=3", f"sampler.num_steps={STEPS}",
        "schedule.size=2", "schedule.interval=1", "eval_prompts=2", "eval_every=2", "checkpoint_every=2",
        "optim.micro_batch=6", "rewards={flatness: 1.0}", "model.lora_rank=4", "model.lora_alpha=8", "optim.lr=3e-2",
        *extra])
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-real-rewards")
    made = {}
    for kind, make in (("flux", make_tiny_flux_pipeline), ("sd3", make_tiny_sd3_pipeline)):
        pipe = make(root / kind)
        emb = preprocess_prompts(pipe, TRAIN_PROMPTS, root / f"{kind}-emb", max_sequence_length=16)
        made[kind] = {"pipeline": pipe, "run": train_tiny_run(kind, pipe, emb, root / f"{kind}-run")}
    checkpoints = make_reward_checkpoints(root / "rewards")
    options = reward_options(checkpoints)
    (root / "opts.yaml").write_text(yaml.safe_dump(options, sort_keys=False))
    (root / "p.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    return {"root": root, "options": options, "opts": root / "opts.yaml", "prompts": root / "p.txt", **made}


def _eval(world, kind, out, *extra, rewards=None, options="OPTS"):
    args = ["eval", "--checkpoint", str(world[kind]["run"]), "--checkpoint", str(world[kind]["pipeline"]),
            "--image-size", str(SIDE), "--blend", "0,0.2", "--rewards", rewards or ",".join(REWARDS), "--prompts", str(world["prompts"]),
            "--steps", str(STEPS), "--out", str(out), *extra]
    if options is not None:
        args += ["--reward-options", str(world["opts"] if options == "OPTS" else options)]
    return runner.invoke(app, args)


@pytest.mark.parametrize(("kind", "cfg", "nfe"), [("flux", 1.0, STEPS), ("sd3", 4.5, 2 * STEPS)])
def test_eval_table_with_every_paper_reward(world, kind, cfg, nfe, tmp_path, monkeypatch):
    """2 checkpoints x 2 blends, five rewards each with finite mean/std/ci95; SD3 with CFG
    counts two model passes per step (FLUX's guidance is distilled: one)."""
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval" / f"{kind}.json"
    result = _eval(world, kind, out, "--cfg", str(cfg))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    run, pipe = str(world[kind]["run"]), str(world[kind]["pipeline"])
    assert [(r["checkpoint"], r["blend"]) for r in rows] == [(run, 0), (run, 0.2), (pipe, 0), (pipe, 0.2)]
    for row in rows:
        assert row["nfe"] == nfe and row["n"] == len(EVAL_PROMPTS) and row["seeds"] == 1
        assert list(row["rewards"]) == REWARDS
        for name, stats in row["rewards"].items():
            assert set(stats) == {"mean", "std", "ci95", "best_of"} and all(math.isfinite(v) for v in stats.values()), (name, stats)
        assert [p["prompt"] for p in row["per_prompt"]] == EVAL_PROMPTS
    assert 0 <= rows[0]["rewards"]["vlm-judge"]["mean"] <= 1  # normalised levels
    assert rows[0]["per_prompt"] != rows[1]["per_prompt"]  # blend 0.2 hands the last step to the base
    assert rows[2]["per_prompt"] == rows[3]["per_prompt"]  # a pipeline folder is its own base
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| checkpoint | blend | NFE | n | hps | pickscore | imagereward | clipscore | vlm-judge |"
    assert len(table) == 2 + 4 and all(f"| {nfe} | {len(EVAL_PROMPTS)} |" in line for line in table[2:])
    assert any(r["rewards"]["clipscore"]["mean"] > 0 for r in rows)  # not a column clamped to 0


def test_the_printed_table_is_the_markdown_file(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "flux.json"
    result = _eval(world, "flux", out)
    assert result.exit_code == 0, result.output
    assert out.with_suffix(".md").read_text() in result.output


def _one_line_failure(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    return result.output


def test_a_reward_file_of_the_wrong_model_is_one_line(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    options = json.loads(json.dumps(world["options"]))
    options["hps"]["path"] = options["imagereward"]["path"]  # ImageReward.pt given as HPS_v2.1_compressed.pt
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(options))
    out = tmp_path / "o.json"
    output = _one_line_failure(_eval(world, "flux", out, options=bad))
    assert "ImageReward.pt is a checkpoint of ImageReward (BLIP), not of HPS-v2.1" in output, output
    assert not out.exists()


def test_a_reward_without_its_options_is_one_line(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    output = _one_line_failure(_eval(world, "flux", tmp_path / "o.json", rewards="hps", options=None))
    assert "reward 'hps'" in output and "path, tokenizer" in output, output


def test_a_reward_without_its_options_names_reward_options(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    output = _one_line_failure(_eval(world, "flux", tmp_path / "o.json", rewards="hps", options=None))
    assert "--reward-options" in output, output

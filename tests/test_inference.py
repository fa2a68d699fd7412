"""`mixgrpo sample`, `eval`, `export`: the base-model blend, checkpoint loading, prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mixgrpo.cli import app
from mixgrpo.core.grids import uniform_grid
from mixgrpo.data import PromptFileError, read_prompt_file
from mixgrpo.inference import blended_velocity, generate_prompts, switch_step
from mixgrpo.inference.policy import export_run, load_policy
from mixgrpo.models.checkpoint import load_embedded
from mixgrpo.text import cached_embeddings
from mixgrpo.train.run import train
from mixgrpo.world.grammar import heldout_eval_prompts
from tiny_runs import make_tiny_checkpoint, tiny_config

PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow triangle"]
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full fine-tune (with EMA) and a LoRA run of the tiny model, 2 iterations each."""
    root = tmp_path_factory.mktemp("inference")
    ckpt = make_tiny_checkpoint(root / "tiny")
    common = ("iterations=2", "optim.lr=3e-3", "eval_every=2")
    train(tiny_config(ckpt, "mixgrpo", *common, "optim.ema=0.5"), root / "full")
    train(tiny_config(ckpt, "mixgrpo", *common, "model.lora_rank=4", "optim.lr=3e-2"), root / "lora")
    return {"root": root, "base": ckpt, "full": root / "full", "lora": root / "lora"}


def _sample(policy, **kw):
    return generate_prompts(policy, cached_embeddings(PROMPTS), PROMPTS, steps=8, base=policy.base, **kw)


# ---------------------------------------------------------------------------- blend
def test_switch_step_counts_base_steps_from_the_clean_end():
    assert [switch_step(25, f) for f in (0, 0.2, 0.5, 1)] == [25, 20, 12, 0]
    with pytest.raises(ValueError, match="blend must be in"):
        switch_step(25, 1.2)


def test_blended_velocity_switches_at_the_right_grid_time():
    grid = uniform_grid(10, shift=3.0)
    calls = []
    v = blended_velocity(lambda x, t: calls.append("policy") or x, lambda x, t: calls.append("base") or x, grid, 0.3)
    for t in grid[:-1]:
        v(torch.zeros(1), torch.full((1,), float(t)))
    assert calls == ["policy"] * 7 + ["base"] * 3


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("solver", ["euler", "dpm2", "dpm3"])
def test_blend_zero_is_the_policy_and_blend_one_the_base_bitwise(runs, kind, solver):
    policy = load_policy(runs[kind])
    plain = _sample(policy, solver=solver)
    assert torch.equal(_sample(policy, solver=solver, blend=0.0), plain)
    base_only = _sample(load_policy(runs["base"]), solver=solver)
    assert torch.equal(_sample(policy, solver=solver, blend=1.0), base_only)
    mixed = _sample(policy, solver=solver, blend=0.5)
    assert not torch.equal(mixed, plain) and not torch.equal(mixed, base_only)
    assert not torch.equal(plain, base_only)  # training changed the model


def test_lora_policy_turns_its_adapter_back_on_after_the_base_steps(runs):
    policy = load_policy(runs["lora"])
    before = _sample(policy)
    _sample(policy, blend=0.5)
    assert torch.equal(_sample(policy), before)


def test_run_loads_ema_weights_when_the_run_kept_them(runs):
    ema, live = load_policy(runs["full"]), load_policy(runs["full"], ema=False)
    assert "ema." in ema.source and "live" in live.source
    assert not torch.equal(_sample(ema), _sample(live))


# ---------------------------------------------------------------------------- export
def test_exported_full_run_reloads_to_the_same_samples(runs, tmp_path):
    export_run(runs["full"], tmp_path / "model")
    exported = load_policy(tmp_path / "model")
    assert torch.equal(_sample(exported), _sample(load_policy(runs["full"])))
    # the exported folder remembers its base, so blending still works
    assert torch.equal(_sample(exported, blend=1.0), _sample(load_policy(runs["base"])))


def test_exported_lora_adapter_reloads_bitwise_and_merged_weights_match(runs, tmp_path):
    reference = _sample(load_policy(runs["lora"]))
    export_run(runs["lora"], tmp_path / "adapter", lora="adapter")
    names = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    assert {"r", "lora_alpha", "target_modules", "peft_type"} <= names
    assert torch.equal(_sample(load_policy(tmp_path / "adapter")), reference)
    export_run(runs["lora"], tmp_path / "merged", lora="merged")
    merged = load_embedded(tmp_path / "merged")  # a plain model: no adapter tensors left
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(_sample(load_policy(tmp_path / "merged")), reference, atol=1e-5, rtol=0)


def test_export_refuses_a_non_empty_destination_and_a_non_run(runs, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_run(runs["full"], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        export_run(runs["base"], tmp_path / "x")


# ---------------------------------------------------------------------------- prompt files
@pytest.mark.parametrize(("name", "text"), [
    ("p.txt", "two red circles\n\n  one yellow triangle  \n"),
    ("p.json", json.dumps([{"prompt": "two red circles"}, "one yellow triangle"])),
    ("p.jsonl", '{"prompt": "two red circles", "id": 3}\n\n"one yellow triangle"\n'),
])
def test_prompt_file_formats(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_prompt_file(tmp_path / name) == ["two red circles", "one yellow triangle"]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("empty.txt", "\n  \n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: invalid JSON"),
    ("nofield.jsonl", '{"prompt": "a"}\n{"caption": "b"}\n', "nofield.jsonl:2: object has no 'prompt' field"),
    ("bad.json", '[{"prompt": "a"},\n ]', "bad.json:2: invalid JSON"),
    ("dict.json", '{"prompt": "a"}', "expected a JSON list"),
    ("blank.json", '["a", ""]', "item 1: expected a non-empty prompt"),
])
def test_prompt_file_errors_name_the_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(tmp_path / name)


def test_missing_and_binary_prompt_files(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompt_file(tmp_path / "bin.txt")


# ---------------------------------------------------------------------------- CLI
def test_sample_cli_writes_a_grid_and_single_images(runs, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    result = runner.invoke(app, ["sample", "--checkpoint", str(runs["lora"]), "--prompts", str(tmp_path / "p.txt"),
                                 "--out", str(tmp_path / "grid.png"), "--steps", "6", "--solver", "dpm2",
                                 "--blend", "0.2", "--images-dir", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_eval_cli_compares_checkpoints_and_blends(runs, tmp_path):
    out = tmp_path / "eval" / "result.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(runs["base"]), "--checkpoint", str(runs["full"]),
                                 "--limit", "5", "--steps", "6", "--seeds", "2", "--blend", "0,0.5,1",
                                 "--rewards", "composition,test-train-brightness", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [(Path(r["checkpoint"]).name, r["blend"]) for r in data["results"]] == [
        (Path(runs["base"]).name, 0), (Path(runs["base"]).name, 0.5), (Path(runs["base"]).name, 1),
        ("full", 0), ("full", 0.5), ("full", 1)]
    for row in data["results"]:
        assert row["n"] == 5 and row["seeds"] == 2 and len(row["per_prompt"]) == 5
        for stats in row["rewards"].values():
            assert set(stats) == {"mean", "std", "ci95", "best_of"} and stats["ci95"] >= 0
            assert stats["best_of"] >= stats["mean"]
        per_prompt = torch.tensor([p["composition"] for p in row["per_prompt"]])
        assert row["rewards"]["composition"]["mean"] == pytest.approx(per_prompt.mean().item(), abs=1e-5)
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 8 and "test-train-brightness" in table and "(best of 2: " in table
    # every row is sampled: scores of the seed-averaged images the CLI draws, recomputed here
    chosen = heldout_eval_prompts()[:5]  # --prompts heldout --limit 5
    brightness, best = {}, {}
    for spec, blend in [(Path(runs["base"]), 0.0), (runs["full"], 0.0), (runs["full"], 0.5), (runs["full"], 1.0)]:
        policy = load_policy(spec)
        images = [generate_prompts(policy, cached_embeddings(chosen), chosen, seed=k * 1_000_003, steps=6,
                                   blend=blend, base=policy.base) for k in range(2)]
        per_seed = torch.stack([im.mean((1, 2, 3)) for im in images])  # (seeds, prompts)
        brightness[(spec.name, blend)], best[(spec.name, blend)] = per_seed.mean(0), per_seed.max(0).values.mean()
    rows = {(Path(r["checkpoint"]).name, r["blend"]): r for r in data["results"]}
    for key, expected in brightness.items():
        got = torch.tensor([p["test-train-brightness"] for p in rows[key]["per_prompt"]])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        # best of the 2 seeds per prompt, averaged: not the mean of the seed-averaged scores
        assert rows[key]["rewards"]["test-train-brightness"]["best_of"] == pytest.approx(best[key].item(), abs=1e-6)
        assert best[key] > expected.mean()
    # a model blended with itself is itself; the fine-tune blended fully is its base
    for name in ("composition", "test-train-brightness"):
        assert rows[(Path(runs["base"]).name, 0.5)]["rewards"][name] == rows[(Path(runs["base"]).name, 0)]["rewards"][name]
        assert rows[("full", 1)]["rewards"][name] == rows[(Path(runs["base"]).name, 0)]["rewards"][name]
    assert rows[("full", 0)]["per_prompt"] != rows[(Path(runs["base"]).name, 0)]["per_prompt"]  # training changed it
    assert rows[("full", 0.5)]["per_prompt"] not in (rows[("full", 0)]["per_prompt"], rows[("full", 1)]["per_prompt"])


@pytest.mark.parametrize(("args", "message"), [
    (["sample", "--prompt", "two red circles", "--blend", "1.5"], "--blend must be in [0, 1]"),
    (["sample", "--prompt", "a", "--prompts", "x.txt"], "either --prompt TEXT"),
    (["sample", "--prompts", "missing.txt"], "prompt file missing.txt does not exist"),
    (["sample", "--prompt", "two red circles", "--solver", "rk4"], "unknown ODE solver"),
    (["sample", "--prompt", "two red circles", "--checkpoint", "nowhere"], "checkpoint nowhere does not exist"),
    (["eval", "--rewards", "composition,beauty"], "unknown reward 'beauty'"),
    (["eval", "--blend", "0,x"], "--blend takes numbers"),
    (["eval", "--seeds", "0", "--limit", "1"], "--seeds and --steps must be >= 1"),
    (["export", "--run", "nowhere", "--out", "y"], "not a run folder"),
    (["export", "--run", "RUN", "--out", "y", "--lora", "both"], "--lora must be 'merged' or 'adapter'"),
])
def test_bad_inputs_fail_with_one_line(runs, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [str(runs["full"]) if a == "RUN" else a for a in args]
    result = runner.invoke(app, [*args, *([] if args[0] == "export" or "--out" in args else ["--out", "o.png"])])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output


def test_checkpoint_folders_without_weights_are_named(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_policy(tmp_path / "empty")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text((runs["full"] / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        load_policy(tmp_path / "run")


def test_eval_reads_a_and_an_as_one(runs, tmp_path):
    """"a red circle" is "one red circle" to the composition reward; "a red circles" is not."""
    from mixgrpo.world.grammar import CountSpec, PromptError, parse_prompt

    assert parse_prompt("a red circle") == parse_prompt("An  RED circle") == CountSpec(1, "red", "circle")
    with pytest.raises(PromptError, match="singular noun"):
        parse_prompt("a red circles")
    (tmp_path / "p.txt").write_text("a red circle\none red circle\n")
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(runs["base"]), "--prompts", str(tmp_path / "p.txt"),
                                 "--steps", "4", "--rewards", "composition", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [p["prompt"] for p in json.loads(out.read_text())["results"][0]["per_prompt"]] == [
        "a red circle", "one red circle"]


def test_run_summary_reports_every_evaluated_reward_by_name(runs):
    """summary.json names each reward the evaluation reported (no names hard-coded in the
    run code): the configured one and the embedded world's composition and flatness."""
    evals = [json.loads(x) for x in (runs["full"] / "eval.jsonl").read_text().splitlines()]
    summary = json.loads((runs["full"] / "summary.json").read_text())
    names = {k.removeprefix("reward_") for k in evals[-1] if k.startswith("reward_")} - {"mean"}
    assert names >= {"test-train-brightness", "composition", "flatness"}
    for name in names:
        assert summary[f"initial_eval_{name}"] == evals[0][f"reward_{name}"]
        assert summary[f"final_eval_{name}"] == evals[-1][f"reward_{name}"]

"""Every CLI command, fed bad input: exit code 2, one line naming the fix, no traceback, and
nothing written where the output would have gone."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mixgrpo.cli import app

runner = CliRunner()

# (command line with OUT for the output path, text the message must contain)
CASES = [
    ("train --out OUT --preset mixgrp", "did you mean 'mixgrpo'"),
    ("train --out OUT --set optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("train --out OUT --set optim.lr=fast", "optim.lr must be float"),
    ("train --out OUT --set iterations", "--set expects key=value"),
    ("train --out OUT --set schedule.size=30", "larger than the 24 trainable steps"),
    ("train --out OUT --set group_size=1", "group_size must be >= 2"),
    ("train --out OUT --set loss.ovf_keep=8", "loss.ovf_keep must be in [2, 7]"),
    ("train --out OUT --set sampler.shared_prefix=true --set sampler.shared_noise=false", "needs sampler.shared_noise"),
    ("train --out OUT --set sampler.prune_offsets=[0]", "needs both sampler.prune_offsets"),
    ("train --out OUT --set optim.max_nonfinite=0", "optim.max_nonfinite must be >= 1"),
    ("train --out OUT --resume", "holds no run"),
    ("train --out OUT --config missing.yaml", "missing.yaml"),
    ("train --out OUT --config bad.yaml", "bad.yaml"),
    ("sample --out OUT --prompt 'two red circles' --blend 1.5", "--blend must be in [0, 1]"),
    ("sample --out OUT --prompt 'two red circles' --steps 0", "--steps must be >= 1"),
    ("sample --out OUT --prompt a --prompts p.txt", "either --prompt TEXT"),
    ("sample --out OUT --prompts missing.txt", "prompt file missing.txt does not exist"),
    ("sample --out OUT --prompts empty.txt", "holds no prompts"),
    ("sample --out OUT --prompt 'two red circles' --solver rk4", "unknown ODE solver"),
    ("sample --out OUT --prompt 'two red circles' --checkpoint nowhere", "checkpoint nowhere does not exist"),
    ("sample --out OUT --prompt 'two red circles' --checkpoint emptydir", "holds no weights"),
    ("eval --out OUT --rewards composition,beauty", "unknown reward 'beauty'"),
    ("eval --out OUT --rewards ,", "--rewards is empty"),
    ("eval --out OUT --blend 0,x", "--blend takes numbers"),
    ("eval --out OUT --seeds 0", "--seeds and --steps must be >= 1"),
    ("eval --out OUT --prompts bad.jsonl", "bad.jsonl:2: invalid JSON"),
    ("eval --out OUT --prompts nofield.json", "item 1: object has no 'prompt' field"),
    ("eval --out OUT --limit 0", "--limit must be >= 1"),
    ("eval --out OUT --prompts outside.txt --rewards composition --steps 2", "outside the embedded grammar"),
    ("export --run nowhere --out OUT", "not a run folder"),
    ("export --run damaged --out OUT", "checkpoint iter_000001 is damaged (weights.safetensors: checksum mismatch)"),
    ("train --out damaged --resume", "no intact checkpoint is left"),
    ("sample --out OUT --prompt 'two red circles' --checkpoint damaged", "iter_000001 is damaged"),
    ("eval --out OUT --checkpoint damaged", "no intact checkpoint is left"),
    ("bench --out OUT --ablate lr", "unknown ablation 'lr'"),
    ("bench --out OUT --ablate window --presets mixgrpo", "drop --presets"),
    ("bench --out OUT --presets mixgrpo,dance", "unknown preset 'dance'"),
    ("bench --out OUT --seeds 0", "--seeds, --iterations and evaluations must be >= 1"),
    ("bench --out OUT --presets 'mixgrpo[loss.ovf_keep=4'", "a '[' is never closed"),
    ("bench --out OUT --presets 'mixgrpo[loss.ovf_keep=9]'", "loss.ovf_keep must be in"),
    ("preprocess --model emptydir --prompts p.txt --out OUT", "not a diffusers pipeline folder"),
    ("preprocess --model emptydir --prompts empty.txt --out OUT", "holds no prompts"),
    ("pretrain --out OUT --steps 0", "must be >= 1"),
    ("pretrain --out OUT --architecture tiny-dit --width 30 --heads 4", "divisible by heads"),
]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "p.txt").write_text("two red circles\n")
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "two red circles"}\n{"prompt": \n')
    (tmp_path / "nofield.json").write_text('[{"prompt": "two red circles"}, {"text": "x"}]')
    (tmp_path / "outside.txt").write_text("a red circle\na red circle please\n")  # the first is in the grammar
    (tmp_path / "emptydir").mkdir()
    _damaged_run(tmp_path / "damaged")
    return tmp_path


def _damaged_run(folder):
    """A run folder whose only checkpoint fails its checksum."""
    import json

    import yaml

    from mixgrpo.train.config import config_to_dict
    from mixgrpo.train.presets import make_preset

    ckpt = folder / "checkpoints" / "iter_000001"
    ckpt.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(make_preset("mixgrpo"))))
    (ckpt / "weights.safetensors").write_bytes(b"not what was written")
    (ckpt / "state.json").write_text(json.dumps({"iteration": 1, "checksums": {"weights.safetensors": "0" * 64}}))
    (folder / "checkpoints" / "latest.json").write_text(json.dumps({"iteration": 1, "path": "iter_000001"}))


def test_every_command_the_cli_registers_has_bad_input_cases():
    """The commands come from the CLI itself: a new command without cases here fails."""
    import typer

    registered = typer.main.get_command(app).commands
    covered = {c.split()[0] for c, _ in CASES}
    assert set(registered) <= covered, f"commands without bad-input cases: {sorted(set(registered) - covered)}"
    assert covered <= set(registered), f"cases for commands the CLI does not have: {sorted(covered - set(registered))}"
    # and every case names options the command really takes (a renamed option would make
    # its case fail for the wrong reason: "no such option")
    for command, _ in CASES:
        import shlex

        words = shlex.split(command)
        options = {o for p in registered[words[0]].params for o in p.opts}
        assert {w for w in words[1:] if w.startswith("--")} <= options, command


@pytest.mark.parametrize(("command", "message"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing_behind(workdir, command, message):
    import shlex

    before = sorted(p.name for p in workdir.iterdir())
    out = "result.png" if command.startswith("sample") else "result.json" if command.startswith("eval") else "outdir"
    result = runner.invoke(app, [a.replace("OUT", out) for a in shlex.split(command)])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert message in " ".join(text.split()), text
    assert text.count("\n") == 0 and "Traceback" not in text, text
    assert sorted(p.name for p in workdir.iterdir()) == before  # no output, no partial file

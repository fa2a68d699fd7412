"""`mixgrpo pretrain` end to end on a small config."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mixgrpo.cli import app
from mixgrpo.models.checkpoint import load_embedded


@pytest.mark.parametrize(("arch", "flags", "field", "value"), [
    ("tiny-unet", ["--widths", "16,32", "--heads", "2"], "widths", [16, 32]),
    ("tiny-dit", ["--width", "32", "--depth", "2", "--heads", "2"], "width", 32),
])
def test_pretrain_cli_writes_a_loadable_checkpoint_and_lowers_the_loss(tmp_path, arch, flags, field, value):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "pretrain", "--out", str(out), "--steps", "30", "--batch-size", "16", "--architecture", arch, *flags,
        "--lr", "2e-3", "--seed", "3",
    ])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json", "loss.png", "samples.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["steps_done"] == 30 and config["pretrain"]["seed"] == 3
    assert "pretrain --out" in config["command"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    model = load_embedded(out)
    assert config["model_type"] == arch and config["model"][field] == value
    assert config["pretrain"]["prompts"] == "all"  # the shipped base's setting
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--steps", "0"], "steps, batch_size and save_every must be >= 1"), (["--minutes", "-1"], "minutes must be > 0"),
     (["--architecture", "tiny-dit", "--width", "30", "--heads", "4"], "divisible by heads"),
     (["--widths", "24,48", "--heads", "5"], "divisible by heads"), (["--widths", "16,x"], "--widths must be comma-separated channel counts"),
     (["--architecture", "vit"], "architecture must be one of tiny-dit, tiny-unet"),
     (["--prompts", "some"], "prompts must be 'train' or 'all'")],
)
def test_pretrain_bad_flags_fail_with_one_line(tmp_path, args, match):
    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert match in result.output
    assert not (tmp_path / "x" / "model.safetensors").exists()

"""Every preset on a real-model code path: a tiny FLUX pipeline saved with save_pretrained,
its prompts preprocessed, trained through the same config users write."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from mixgrpo.text.preprocess import preprocess_prompts
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer
from tiny_pipelines import make_tiny_flux_pipeline

PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow triangle", "a photo of a cat"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-train")
    pipe = make_tiny_flux_pipeline(root / "pipe")
    emb = preprocess_prompts(pipe, PROMPTS, root / "emb", max_sequence_length=16)
    return pipe, emb


def _config(flux, preset, *extra):
    pipe, emb = flux
    return apply_overrides(make_preset(preset), [
        "model.kind=flux", f"model.path={pipe}", f"model.embeddings={emb}", "model.image_size=16",
        "iterations=2", "prompts_per_iter=2", "group_size=3", "sampler.num_steps=6", "schedule.size=2",
        "schedule.interval=1", "eval_prompts=2", "eval_every=2", "checkpoint_every=2", "optim.micro_batch=6",
        "rewards={flatness: 1.0}", "optim.lr=1e-2", *extra,
    ])


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-flash"])
def test_lora_grpo_on_flux_changes_only_the_adapter(flux, preset, tmp_path):
    cfg = _config(flux, preset, "model.lora_rank=4")
    trainer = GRPOTrainer(cfg)
    transformer = trainer.backend.lora_module
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
    summary = train(cfg, tmp_path / "run", trainer=trainer)
    assert summary["iterations"] == 2 and (tmp_path / "run" / "checkpoints" / "latest.json").is_file()
    after = dict(transformer.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # base weights bitwise unchanged
    assert any(not torch.equal(after[n], v) for n, v in lora.items())  # the adapter learned
    from mixgrpo.inference.policy import load_policy

    with pytest.raises(ValueError, match="embedded-model runs only"):
        load_policy(tmp_path / "run")
    batch = trainer.rollout(0)
    assert batch.images.shape == (6, 3, 16, 16) and batch.images.min() >= 0 and batch.images.max() <= 1


def test_full_fine_tune_on_flux_updates_the_transformer(flux):
    trainer = GRPOTrainer(_config(flux, "mixgrpo"))
    before = [p.detach().clone() for p in trainer.params]
    trainer.step(0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_real_model_config_errors(flux, tmp_path):
    with pytest.raises(ValueError, match=r"needs model\.path"):
        apply_overrides(make_preset("mixgrpo"), ["model.kind=flux"])
    with pytest.raises(ValueError, match="exceeds the 4 prompts"):
        GRPOTrainer(_config(flux, "mixgrpo", "prompts_per_iter=5"))
    with pytest.raises(ValueError, match="multiple of 4"):
        GRPOTrainer(_config(flux, "mixgrpo", "model.image_size=18"))

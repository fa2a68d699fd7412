"""Every preset on the real-model code paths: tiny FLUX and SD3 pipelines saved with
save_pretrained, their prompts preprocessed, trained through the same config users write,
exported and loaded back with diffusers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from mixgrpo.inference.diffusers_export import LORA_WEIGHTS
from mixgrpo.inference.policy import export_run, load_policy
from mixgrpo.text.preprocess import preprocess_prompts
from mixgrpo.train.backends import scheduler_shift
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer
from tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow triangle", "a photo of a cat"]
PIPELINES = {"flux": ("FluxPipeline", make_tiny_flux_pipeline), "sd3": ("StableDiffusion3Pipeline", make_tiny_sd3_pipeline)}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def model(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"{kind}-train")
    pipe = PIPELINES[kind][1](root / "pipe")
    emb = preprocess_prompts(pipe, PROMPTS, root / "emb", max_sequence_length=16)
    return kind, pipe, emb


def _config(model, preset, *extra):
    kind, pipe, emb = model
    return apply_overrides(make_preset(preset), [
        f"model.kind={kind}", f"model.path={pipe}", f"model.embeddings={emb}", "model.image_size=16",
        "iterations=2", "prompts_per_iter=2", "group_size=3", "sampler.num_steps=6", "schedule.size=2",
        "schedule.interval=1", "eval_prompts=2", "eval_every=2", "checkpoint_every=2", "optim.micro_batch=6",
        "rewards={flatness: 1.0}", "optim.lr=1e-2", *extra,
    ])


def _probe(transformer_call, kind, seed=0):
    """One transformer forward on fixed random inputs of the tiny models' shapes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([0.7, 0.3])
    if kind == "flux":
        from mixgrpo.models.flux import FluxCondition as Cond
        cond = Cond(torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, generator=g))
    else:
        from mixgrpo.models.sd3 import SD3Condition
        cond = SD3Condition(torch.randn(2, 24, 32, generator=g), torch.randn(2, 32, generator=g))
    return transformer_call(x, t, cond)


def _velocity_model(kind, transformer):
    if kind == "flux":
        from mixgrpo.models.flux import FluxVelocityModel
        return FluxVelocityModel(transformer, 2)
    from mixgrpo.models.sd3 import SD3VelocityModel
    return SD3VelocityModel(transformer, 2)


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-flash"])
def test_lora_grpo_changes_only_the_adapter(model, preset, tmp_path):
    kind, pipe, _ = model
    cfg = _config(model, preset, "model.lora_rank=4", "model.lora_alpha=8")
    trainer = GRPOTrainer(cfg)
    transformer = trainer.backend.lora_module
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
    summary = train(cfg, tmp_path / "run", trainer=trainer)
    assert summary["iterations"] == 2 and (tmp_path / "run" / "checkpoints" / "latest.json").is_file()
    after = dict(transformer.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # base weights bitwise unchanged
    assert any(not torch.equal(after[n], v) for n, v in lora.items())  # the adapter learned
    assert load_policy(tmp_path / "run").kind == kind  # sample/eval read the run (tests/test_real_model_inference.py)
    batch = trainer.rollout(0)
    assert batch.images.shape == (6, 3, 16, 16) and batch.images.min() >= 0 and batch.images.max() <= 1
    if preset != "mixgrpo":
        return
    # the exported adapter loads with diffusers' own load_lora_weights and reproduces the
    # trained transformer (alpha / r restored from the file's metadata)
    import diffusers

    out = export_run(tmp_path / "run", tmp_path / "lora", lora="adapter", ema=False)
    assert (out / LORA_WEIGHTS).is_file() and json.loads((out / "mixgrpo_export.json").read_text())["rank"] == 4
    pipeline = getattr(diffusers, PIPELINES[kind][0]).from_pretrained(pipe, local_files_only=True)
    pipeline.load_lora_weights(out)
    with torch.no_grad():
        ours = _probe(trainer.model.velocity, kind)
        theirs = _probe(_velocity_model(kind, pipeline.transformer).velocity, kind)
        plain = _probe(_velocity_model(kind, getattr(diffusers, PIPELINES[kind][0]).from_pretrained(
            pipe, local_files_only=True).transformer).velocity, kind)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-5)  # the adapter matters on this probe
    # merged: a transformer folder equal to base + adapter
    merged = export_run(tmp_path / "run", tmp_path / "merged", lora="merged", ema=False)
    cls = type(pipeline.transformer)
    with torch.no_grad():
        folded = _probe(_velocity_model(kind, cls.from_pretrained(merged / "transformer")).velocity, kind)
    assert torch.allclose(ours, folded, atol=1e-5)


def test_full_fine_tune_updates_the_transformer_and_exports(model, tmp_path):
    kind, _, _ = model
    cfg = _config(model, "mixgrpo")
    trainer = GRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    train(cfg, tmp_path / "run", trainer=trainer)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    out = export_run(tmp_path / "run", tmp_path / "export", ema=False)
    cls = type(trainer.backend.lora_module)
    with torch.no_grad():
        assert torch.equal(_probe(trainer.model.velocity, kind),
                           _probe(_velocity_model(kind, cls.from_pretrained(out / "transformer")).velocity, kind))


def test_bf16_lora_keeps_a_bf16_base_and_an_fp32_adapter(model):
    trainer = GRPOTrainer(_config(model, "mixgrpo", "model.lora_rank=4", "model.dtype=bfloat16"))
    dtypes = {("lora" if "lora_" in n else "base", p.dtype) for n, p in trainer.backend.lora_module.named_parameters()}
    assert dtypes == {("lora", torch.float32), ("base", torch.bfloat16)}
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and torch.isfinite(torch.tensor(row["loss"]))


def test_gradient_checkpointing_gives_the_same_update(model):
    params = []
    for flag in ("false", "true"):
        trainer = GRPOTrainer(_config(model, "mixgrpo", "model.lora_rank=4", f"model.gradient_checkpointing={flag}"))
        trainer.step(0)
        params.append([p.detach().clone() for p in trainer.params])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*params, strict=True))


def test_real_model_config_errors(model, tmp_path):
    kind = model[0]
    with pytest.raises(ValueError, match=r"needs model\.path"):
        apply_overrides(make_preset("mixgrpo"), [f"model.kind={kind}"])
    with pytest.raises(ValueError, match="exceeds the 4 prompts"):
        GRPOTrainer(_config(model, "mixgrpo", "prompts_per_iter=5"))
    with pytest.raises(ValueError, match="multiple of 4"):
        GRPOTrainer(_config(model, "mixgrpo", "model.image_size=18"))
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        _config(model, "mixgrpo", "model.device=cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        _config(model, "mixgrpo", "model.device=gpu0")
    with pytest.raises(ValueError, match="shift must be a number"):
        _config(model, "mixgrpo", "sampler.shift=auto")


def test_scheduler_shift_matches_the_pipelines_sigmas(model, tmp_path):
    """`sampler.shift=scheduler` reads the pipeline's scheduler config; the trainer's grid
    then equals the sigmas diffusers' scheduler uses (FLUX: dynamic shifting from the image
    token count, mu from diffusers' calculate_shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from mixgrpo.core.grids import time_shift

    _, pipe, _ = model
    trainer = GRPOTrainer(_config(model, "mixgrpo", "sampler.shift=scheduler"))
    static = FlowMatchEulerDiscreteScheduler.from_pretrained(pipe / "scheduler")
    assert trainer.cfg.sampler.shift == pytest.approx(static.config.shift)  # 1.0 (flux), 3.0 (sd3)
    # a FLUX.1-style dynamic config at 1024 px (128x128 latents -> 4096 tokens after 2x2 packing)
    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 3.0}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    shift = scheduler_shift(tmp_path, 128)
    dynamic = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = torch.linspace(1.0, 1 / 25, 25, dtype=torch.float64)
    dynamic.set_timesteps(sigmas=sigmas.numpy(), mu=calculate_shift(64 * 64))
    assert shift == pytest.approx(3.158, abs=1e-3)  # exp(1.15)
    assert torch.allclose(time_shift(sigmas, shift).float(), dynamic.sigmas[:-1].float(), atol=1e-5)


@pytest.mark.parametrize(("preset", "extra"), [
    ("nft", []), ("awm", []), ("branch-grpo", ["group_size=4", "sampler.tree_splits=[0, 2]", "prompts_per_iter=1"]),
])
@pytest.mark.parametrize("lora", [0, 4])
def test_newer_methods_train_flux_and_sd3(model, preset, extra, lora, tmp_path):
    """DiffusionNFT, AWM and BranchGRPO on the tiny pipelines, LoRA and full: the run
    finishes, the trained weights move, a LoRA run leaves the base bitwise unchanged."""
    cfg = _config(model, preset, f"model.lora_rank={lora}", "model.lora_alpha=8", *extra)
    trainer = GRPOTrainer(cfg)
    transformer = trainer.backend.lora_module
    frozen = {n: p.detach().clone() for n, p in transformer.named_parameters() if lora and "lora_" not in n}
    before = [p.detach().clone() for p in trainer.params]
    summary = train(cfg, tmp_path / "run", trainer=trainer)
    assert summary["iterations"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    after = dict(transformer.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())

"""FLUX.2: ``model.kind=flux2`` against diffusers' ``Flux2Pipeline`` on a tiny random pipeline
built offline (tests/tiny_pipelines.py): a 30-layer Mistral-3 text encoder, a VAE with
BatchNorm latent statistics, 16 px images (4x4 patchified latents of 16 channels), 6 Euler steps,
float32 on the CPU.

Measured here (max |difference|, 2-core CPU):

* our deterministic Euler sampler through ``load_diffusers_model`` and `mixgrpo preprocess`
  embeddings vs ``Flux2Pipeline`` (its own ``encode_prompt``, its sigmas, the same initial
  latents, ``output_type="latent"``): 0.0 at guidance 4 and 2.5, bitwise, so that is asserted;
* the pipeline folder sampled through ``load_policy`` (prompts encoded into the cache at the
  pipeline's length 512, guidance 4, FLUX.2's step-dependent shift as our grid) vs the
  pipeline's ``output_type="pt"`` images from the same noise: 5.4e-7 (float32 rounding of the
  sigmas and of the [-1, 1] -> [0, 1] rescale), asserted <= 2e-6;
* exports vs the trained model's velocity: see tests/tiny_backbones.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from mixgrpo.cli import app  # noqa: E402
from mixgrpo.core.grids import uniform_grid  # noqa: E402
from mixgrpo.core.sampler import mixed_plan, sample  # noqa: E402
from mixgrpo.inference.diffusers_models import load_diffusers_model, scheduler_shift, vae_decoder  # noqa: E402
from mixgrpo.inference.generate import generate_prompts  # noqa: E402
from mixgrpo.inference.policy import load_policy  # noqa: E402
from mixgrpo.text.preprocess import load_embeddings, preprocess_prompts  # noqa: E402
from mixgrpo.train.trainer import GRPOTrainer  # noqa: E402
from tiny_backbones import (  # noqa: E402
    PROMPTS,
    SIDE,
    STEPS,
    check_bf16_checkpointed_step,
    check_exports,
    check_full_fine_tune,
    check_lora_off_is_base,
    run_config,
    train_lora,
)
from tiny_pipelines import make_tiny_flux2_pipeline, make_tiny_qwen_image_pipeline  # noqa: E402

LATENT, LENGTH = 4, 48  # patchified latent side; text length (the system message is ~30 tokens)
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    pipe = make_tiny_flux2_pipeline(root / "pipe")
    emb = preprocess_prompts(pipe, PROMPTS, root / "emb", max_sequence_length=LENGTH)
    return {"root": root, "pipe": pipe, "emb": emb}


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 16, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance", [4.0, 2.5])
def test_euler_through_our_loader_equals_the_pipeline(world, guidance):
    pipe = diffusers.Flux2Pipeline.from_pretrained(world["pipe"], local_files_only=True)
    x1 = _noise()
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=LENGTH)
        theirs = pipe(prompt_embeds=embeds, latents=x1, height=SIDE, width=SIDE, num_inference_steps=STEPS,
                      guidance_scale=guidance, output_type="latent", return_dict=False)[0]
    theirs = theirs.permute(0, 2, 1).reshape(x1.shape)  # the pipeline's tokens are row-major pixels
    sigmas = pipe.scheduler.sigmas.clone()
    parts = load_diffusers_model("flux2", world["pipe"], image_size=SIDE, flux_guidance=guidance)
    _, tensors, _ = load_embeddings(world["emb"], expect_dim=24)
    assert set(tensors) == {"prompt_embeds"} and tensors["prompt_embeds"].shape == (3, LENGTH, 24)
    cond = parts.conditions(world["emb"])(PROMPTS)
    with torch.no_grad():
        ours = sample(lambda x, t: parts.model.velocity(x, t, cond), x1, mixed_plan(sigmas.double(), [], "euler")).x0
    diff = (ours - theirs).abs().max().item()
    assert diff == 0.0, f"max |ours - Flux2Pipeline| = {diff:.3g} at guidance {guidance}"
    assert (theirs - x1).abs().max() > 0.1
    # FLUX.2's shift: empirical mu from the token count (4 * 4) and the step count
    shift = scheduler_shift(world["pipe"], LATENT, STEPS)
    assert torch.allclose(uniform_grid(STEPS, shift=shift).float(), sigmas, atol=1e-6)


def test_pipeline_folder_samples_the_pipelines_images(world, tmp_path):
    """``load_policy`` on the pipeline folder samples at the pipeline's defaults (guidance 4,
    text length 512) on the grid FLUX.2 uses for the step count asked for."""
    policy = load_policy(world["pipe"], image_size=SIDE, cache_dir=tmp_path)
    assert policy.kind == "flux2" and policy.model.guidance_scale == 4.0
    assert policy.grid_shift(STEPS) != policy.grid_shift(50)  # the shift depends on the steps
    ours = generate_prompts(policy, policy.conditions(PROMPTS), PROMPTS, seed=1, steps=STEPS, decode=policy.decode,
                            shift=policy.grid_shift(STEPS))
    pipe = diffusers.Flux2Pipeline.from_pretrained(world["pipe"], local_files_only=True)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=_noise(seed=1), height=SIDE, width=SIDE, num_inference_steps=STEPS,
                      output_type="pt", return_dict=False)[0]
    diff = (ours - theirs.float()).abs().max().item()
    assert diff <= 2e-6, f"max |ours - Flux2Pipeline images| = {diff:.3g}"


def test_lora_switched_off_is_the_base_bitwise(world):
    parts = load_diffusers_model("flux2", world["pipe"], image_size=SIDE)
    adapted = check_lora_off_is_base(parts, parts.conditions(world["emb"])(PROMPTS), _noise(2))
    assert any("single_transformer_blocks" in n for n in adapted)  # the fused single-stream input too


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-flash"])
def test_grpo_trains_only_the_adapter_and_exports(world, preset, tmp_path):
    trainer = train_lora("flux2", world["pipe"], world["emb"], preset, tmp_path / "run", "model.flux_guidance=4")
    batch = trainer.rollout(0)
    assert batch.images.shape == (6, 3, SIDE, SIDE) and batch.images.min() >= 0 and batch.images.max() <= 1
    if preset == "mixgrpo":
        check_exports("flux2", diffusers.Flux2Pipeline, world["pipe"], tmp_path / "run", trainer, tmp_path)


def test_scheduler_shift_follows_the_step_count(world):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    trainer = GRPOTrainer(run_config("flux2", world["pipe"], world["emb"], "mixgrpo", "sampler.shift=scheduler"))
    assert trainer.cfg.sampler.shift == pytest.approx(math.exp(compute_empirical_mu(LATENT**2, STEPS)))
    with pytest.raises(ValueError, match="depends on the number of steps"):
        scheduler_shift(world["pipe"], LATENT)


def test_bf16_lora_with_gradient_checkpointing_steps(world):
    check_bf16_checkpointed_step("flux2", world["pipe"], world["emb"], "model.flux_guidance=4")


def test_full_fine_tune_exports_a_transformer_folder(world, tmp_path):
    check_full_fine_tune("flux2", world["pipe"], world["emb"], tmp_path, "model.flux_guidance=4")


def test_bad_inputs_name_the_fix(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    parts = load_diffusers_model("flux2", world["pipe"], image_size=SIDE)
    with pytest.raises(ValueError, match="guidance-distilled: set its guidance scale"):
        parts.model.velocity(_noise(), torch.full((3,), 0.5), parts.conditions(world["emb"])(PROMPTS), 2.0)
    qwen = make_tiny_qwen_image_pipeline(tmp_path / "qwen")
    with pytest.raises(ValueError, match="not a Flux2Transformer2DModel: pass a pipeline folder"):
        GRPOTrainer(run_config("flux2", qwen, world["emb"], "mixgrpo"))
    with pytest.raises(ValueError, match="a flux2 pipeline has an AutoencoderKLFlux2: pass a flux2 pipeline folder"):
        vae_decoder(qwen, torch.device("cpu"), "flux2")
    klein = tmp_path / "klein"
    klein.mkdir()
    index = json.loads((world["pipe"] / "model_index.json").read_text())
    (klein / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2KleinPipeline"}))
    for args, message in [
        (["sample", "--checkpoint", str(klein), "--image-size", "16", "--prompt", PROMPTS[0],
          "--out", str(tmp_path / "o.png")], "supported pipelines (text-to-image)"),
        (["sample", "--checkpoint", str(qwen), "--image-size", "16", "--embeddings", str(world["emb"]),
          "--prompt", PROMPTS[0], "--out", str(tmp_path / "o.png")], "preprocess with its pipeline"),
        (["sample", "--checkpoint", str(world["pipe"]), "--image-size", "16", "--cfg", "3", "--prompt", PROMPTS[0],
          "--out", str(tmp_path / "o.png")], "guidance-distilled"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output

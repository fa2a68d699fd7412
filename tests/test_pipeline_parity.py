"""Our FLUX and SD3 adapters sample what diffusers' own pipelines sample.

Tiny random pipelines built offline (tests/tiny_pipelines.py). With the same initial latents,
prompt embeddings (the pipeline's own ``encode_prompt``), guidance and the pipeline's own sigma
grid (read back from its scheduler after the run), our deterministic Euler sampler through
``FluxVelocityModel`` / ``SD3VelocityModel`` must end where ``FluxPipeline`` /
``StableDiffusion3Pipeline`` end (``output_type="latent"``). And a LoRA run exported with
``mixgrpo export --lora adapter`` and loaded with the pipeline's ``load_lora_weights``
reproduces the images our trained model samples.

Measured here (float32, CPU): the final latents are bitwise equal for FLUX (guidance 1 and
3.5), SD3 (guidance 1 and CFG 4.5) and the LoRA-loaded FLUX pipeline, so that is what is
asserted; decoded LoRA images differ by at most 3.6e-7 (the pipeline's and our [-1, 1] ->
[0, 1] rescaling round differently), asserted <= 1e-6.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from mixgrpo.core.sampler import mixed_plan, sample
from mixgrpo.models.flux import FluxCondition, FluxVelocityModel, pack_latents, unpack_latents
from mixgrpo.models.sd3 import SD3Condition, SD3VelocityModel
from tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

PROMPTS = ["two red circles", "a photo of a cat"]
SIDE, LATENT = 16, 8  # pixels; the tiny VAE downsamples by 2
STEPS = 6
TOL = 0.0  # latents: bitwise


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {"flux": make_tiny_flux_pipeline(root / "flux"), "sd3": make_tiny_sd3_pipeline(root / "sd3")}


def _noise(channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), channels, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _euler(model, x1: torch.Tensor, cond, sigmas: torch.Tensor, guidance: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return sample(lambda x, t: model.velocity(x, t, cond, guidance), x1,
                      mixed_plan(sigmas.double(), [], "euler")).x0


def _flux_run(pipe, x1: torch.Tensor, guidance: float, output_type: str = "latent"):
    """The pipeline's own loop from our latents; returns (its output, its sigma grid, our condition)."""
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=PROMPTS, max_sequence_length=16)
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=pack_latents(x1), height=SIDE,
                   width=SIDE, num_inference_steps=STEPS, guidance_scale=guidance, output_type=output_type,
                   return_dict=False)[0]
    if output_type == "latent":
        out = unpack_latents(out, LATENT, LATENT)
    return out, pipe.scheduler.sigmas.clone(), FluxCondition(embeds, pooled)


def _sd3_run(pipe, x1: torch.Tensor, guidance: float):
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=PROMPTS, prompt_3=PROMPTS, negative_prompt=[""] * len(PROMPTS),
            do_classifier_free_guidance=True, max_sequence_length=16)
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                   negative_pooled_prompt_embeds=neg_pooled, latents=x1, height=SIDE, width=SIDE,
                   num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent", return_dict=False)[0]
    return out, pipe.scheduler.sigmas.clone(), SD3Condition(embeds, pooled, neg, neg_pooled)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_flux_euler_equals_flux_pipeline(folders, guidance):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folders["flux"], local_files_only=True)
    x1 = _noise(pipe.transformer.config.in_channels // 4)
    theirs, sigmas, cond = _flux_run(pipe, x1, guidance)
    assert sigmas.numel() == STEPS + 1 and sigmas[-1] == 0
    ours = _euler(FluxVelocityModel(pipe.transformer, LATENT, guidance_scale=guidance), x1, cond, sigmas)
    diff = (ours.float() - theirs).abs().max().item()
    assert diff <= TOL, f"FLUX: max |ours - FluxPipeline| = {diff:.3g}"
    assert (theirs - x1).abs().max() > 0.1  # the loop really moved the latents


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_euler_equals_sd3_pipeline(folders, guidance):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], local_files_only=True)
    x1 = _noise(pipe.transformer.config.in_channels)
    theirs, sigmas, cond = _sd3_run(pipe, x1, guidance)
    assert sigmas.numel() == STEPS + 1 and sigmas[-1] == 0
    ours = _euler(SD3VelocityModel(pipe.transformer, LATENT), x1, cond, sigmas, guidance)
    diff = (ours.float() - theirs).abs().max().item()
    assert diff <= TOL, f"SD3: max |ours - StableDiffusion3Pipeline| = {diff:.3g}"
    assert (theirs - x1).abs().max() > 0.1


def test_an_exported_lora_in_the_flux_pipeline_reproduces_our_trained_model(folders, tmp_path):
    """Train a LoRA run, export its adapter, load it with FluxPipeline.load_lora_weights: the
    pipeline's latents and decoded images equal our trained model's, and differ from the base."""
    from diffusers import FluxPipeline

    from mixgrpo.inference.diffusers_export import export_diffusers_run
    from mixgrpo.text.preprocess import preprocess_prompts
    from mixgrpo.train.config import apply_overrides
    from mixgrpo.train.presets import make_preset
    from mixgrpo.train.run import train
    from mixgrpo.train.trainer import GRPOTrainer

    folder = folders["flux"]
    emb = preprocess_prompts(folder, PROMPTS, tmp_path / "emb", max_sequence_length=16)
    cfg = apply_overrides(make_preset("mixgrpo"), [
        "model.kind=flux", f"model.path={folder}", f"model.embeddings={emb}", f"model.image_size={SIDE}",
        "model.lora_rank=4", "model.lora_alpha=8", "model.flux_guidance=3.5", "iterations=2", "prompts_per_iter=2",
        "group_size=3", "sampler.num_steps=6", "schedule.size=2", "schedule.interval=1", "eval_prompts=2",
        "eval_every=2", "checkpoint_every=2", "optim.micro_batch=6", "rewards={flatness: 1.0}", "optim.lr=3e-2"])
    trainer = GRPOTrainer(cfg)
    train(cfg, tmp_path / "run", trainer=trainer)
    out = export_diffusers_run(tmp_path / "run", tmp_path / "lora", lora="adapter", ema=False)

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    x1 = _noise(pipe.transformer.config.in_channels // 4, seed=1)
    base_latents, _, _ = _flux_run(pipe, x1, 3.5)
    pipe.load_lora_weights(out)
    theirs, sigmas, cond = _flux_run(pipe, x1, 3.5)
    theirs_images, _, _ = _flux_run(pipe, x1, 3.5, output_type="pt")

    trainer.model.eval()
    ours = _euler(trainer.model, x1, cond, sigmas).float()
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"LoRA: max |ours - FluxPipeline + load_lora_weights| = {diff:.3g}"
    assert (theirs - base_latents).abs().max() > 1e-3  # the adapter changed the samples
    image_diff = (trainer.backend.decode(ours).cpu() - theirs_images.float()).abs().max().item()
    assert image_diff <= 1e-6, f"LoRA images: max |ours - pipeline| = {image_diff:.3g}"

"""Qwen-Image: ``model.kind=qwen-image`` against diffusers' ``QwenImagePipeline`` on a tiny random
pipeline built offline (tests/tiny_pipelines.py): Qwen2.5-VL text encoder, one-frame video VAE,
16 px images (8x8 latents), 6 Euler steps, float32 on the CPU.

Measured here (max |difference|, 2-core CPU):

* our deterministic Euler sampler through ``load_diffusers_model`` and `mixgrpo preprocess`
  embeddings vs ``QwenImagePipeline`` (its own ``encode_prompt``, its sigmas, the same initial
  latents, ``output_type="latent"``): 0.0 at guidance 1 and 0.0 at true CFG 4 with its norm
  rescale (the stored embeddings carry extra zero padding that the adapter trims): bitwise,
  so that is asserted;
* the pipeline folder sampled through ``load_policy`` (prompts encoded into the cache, the
  scheduler's dynamic shift as our grid) vs the pipeline's ``output_type="pt"`` images from
  the same noise: 2.4e-7 at guidance 1 and at CFG 4 (float32 rounding of the sigmas and of the
  [-1, 1] -> [0, 1] rescale), asserted <= 1e-6;
* prompts encoded one per batch vs three per batch: 2.4e-7 (the text encoder's rounding over
  different padding), asserted <= 2e-6;
* exports vs the trained model's velocity: see tests/tiny_backbones.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from mixgrpo.cli import app  # noqa: E402
from mixgrpo.core.grids import uniform_grid  # noqa: E402
from mixgrpo.core.sampler import mixed_plan, sample  # noqa: E402
from mixgrpo.inference.diffusers_models import load_diffusers_model, scheduler_shift  # noqa: E402
from mixgrpo.inference.generate import generate_prompts  # noqa: E402
from mixgrpo.inference.policy import load_policy  # noqa: E402
from mixgrpo.models.flux import pack_latents, unpack_latents  # noqa: E402
from mixgrpo.models.qwen_image import QwenImageCondition, QwenImageVelocityModel  # noqa: E402
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

LATENT, LENGTH = 8, 64  # latent side; text length the prompts are encoded at
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-image")
    pipe = make_tiny_qwen_image_pipeline(root / "pipe")
    emb = preprocess_prompts(pipe, PROMPTS, root / "emb", max_sequence_length=LENGTH)
    return {"root": root, "pipe": pipe, "emb": emb}


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def test_preprocess_keeps_masks_and_the_negative_prompt(world, tmp_path):
    """The stored rows are zero-padded to the longest prompt with 0 in the mask, and the negative
    prompt " " is stored per row. One prompt per batch (each batch as long as its prompt) gives
    the same tensors up to the text encoder's float rounding."""
    prompts, tensors, index = load_embeddings(world["emb"], expect_dim=16, expect_pooled=None)
    assert prompts == PROMPTS and index["pipeline"] == "QwenImagePipeline"
    assert set(tensors) == {"prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"}
    lengths = tensors["prompt_mask"].sum(1)
    assert lengths.max() == tensors["prompt_embeds"].shape[1] and len(set(lengths.tolist())) == 3
    assert (tensors["prompt_embeds"][tensors["prompt_mask"] == 0] == 0).all()
    _, single, _ = load_embeddings(preprocess_prompts(world["pipe"], PROMPTS, tmp_path / "e", max_sequence_length=LENGTH,
                                                      batch_size=1))
    assert all(torch.equal(single[k], tensors[k]) for k in ("prompt_mask", "negative_mask", "negative_embeds"))
    assert torch.allclose(single["prompt_embeds"], tensors["prompt_embeds"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_euler_through_our_loader_equals_the_pipeline(world, guidance):
    pipe = diffusers.QwenImagePipeline.from_pretrained(world["pipe"], local_files_only=True)
    x1 = _noise()
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=LENGTH)
        neg, neg_mask = pipe.encode_prompt([" "] * len(PROMPTS), max_sequence_length=LENGTH)
        cfg = {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask} if guidance > 1 else {}
        theirs = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, latents=pack_latents(x1), height=SIDE, width=SIDE,
                      num_inference_steps=STEPS, true_cfg_scale=guidance, output_type="latent", return_dict=False,
                      **cfg)[0]
    theirs, sigmas = unpack_latents(theirs, LATENT, LATENT), pipe.scheduler.sigmas.clone()
    parts = load_diffusers_model("qwen-image", world["pipe"], image_size=SIDE)
    cond = parts.conditions(world["emb"])(PROMPTS)
    cond = QwenImageCondition(*(torch.nn.functional.pad(v, (0, 0, 0, 3) if v.ndim == 3 else (0, 3))
                                for v in (cond.prompt_embeds, cond.prompt_mask, cond.negative_embeds,
                                          cond.negative_mask)))  # more padding changes nothing
    with torch.no_grad():
        ours = sample(lambda x, t: parts.model.velocity(x, t, cond, guidance), x1,
                      mixed_plan(sigmas.double(), [], "euler")).x0
    diff = (ours - theirs).abs().max().item()
    assert diff == 0.0, f"max |ours - QwenImagePipeline| = {diff:.3g} at guidance {guidance}"
    assert (theirs - x1).abs().max() > 0.1  # the loop really moved the latents
    # the scheduler's dynamic shift (token count (8/2)^2) is the pipeline's grid
    grid = uniform_grid(STEPS, shift=scheduler_shift(world["pipe"], LATENT))
    assert torch.allclose(grid.float(), sigmas, atol=1e-6)


def test_a_shift_terminal_is_named_not_silently_dropped(tmp_path, caplog):
    """Qwen-Image's own scheduler stretches its grid to end at shift_terminal; our grid ends at
    0 with the same dynamic shift, and says so."""
    (tmp_path / "scheduler").mkdir()
    config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
              "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        shift = scheduler_shift(tmp_path, 128)  # 1024 px: 64 x 64 tokens
    assert shift == pytest.approx(np.exp(0.5 + 0.4 * (4096 - 256) / (8192 - 256)))
    assert "shift_terminal=0.02" in caplog.text


def test_pipeline_folder_samples_the_pipelines_images(world, tmp_path):
    """``load_policy`` on the pipeline folder: prompts encoded at the pipeline's default length
    into the cache, its scheduler's shift, true CFG 4 with " " as the negative prompt."""
    policy = load_policy(world["pipe"], image_size=SIDE, cache_dir=tmp_path)
    assert policy.kind == "qwen-image" and policy.base is policy.model
    ours = generate_prompts(policy, policy.conditions(PROMPTS), PROMPTS, seed=1, steps=STEPS, guidance=4.0,
                            decode=policy.decode, shift=policy.grid_shift(STEPS))
    pipe = diffusers.QwenImagePipeline.from_pretrained(world["pipe"], local_files_only=True)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, negative_prompt=" ", latents=pack_latents(_noise(seed=1)), height=SIDE,
                      width=SIDE, num_inference_steps=STEPS, true_cfg_scale=4.0, output_type="pt",
                      return_dict=False)[0]
    diff = (ours - theirs.float()).abs().max().item()
    assert diff <= 1e-6, f"max |ours - QwenImagePipeline images| = {diff:.3g}"


def test_lora_switched_off_is_the_base_bitwise(world):
    parts = load_diffusers_model("qwen-image", world["pipe"], image_size=SIDE)
    check_lora_off_is_base(parts, parts.conditions(world["emb"])(PROMPTS), _noise(2), (1.0, 4.0))


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-flash"])
def test_grpo_trains_only_the_adapter_and_exports(world, preset, tmp_path):
    trainer = train_lora("qwen-image", world["pipe"], world["emb"], preset, tmp_path / "run")
    batch = trainer.rollout(0)
    assert batch.images.shape == (6, 3, SIDE, SIDE) and batch.images.min() >= 0 and batch.images.max() <= 1
    if preset == "mixgrpo":
        check_exports("qwen-image", diffusers.QwenImagePipeline, world["pipe"], tmp_path / "run", trainer, tmp_path)


def test_cfg_training_runs_two_passes(world, tmp_path):
    """Training at true CFG 4 (``sampler.guidance=4``) uses the stored negative prompt."""
    trainer = GRPOTrainer(run_config("qwen-image", world["pipe"], world["emb"], "mixgrpo", "model.lora_rank=4",
                                     "sampler.guidance=4", "iterations=1"))
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and np.isfinite(row["loss"])


def test_bf16_lora_with_gradient_checkpointing_steps(world):
    check_bf16_checkpointed_step("qwen-image", world["pipe"], world["emb"])


def test_full_fine_tune_exports_a_transformer_folder(world, tmp_path):
    check_full_fine_tune("qwen-image", world["pipe"], world["emb"], tmp_path)


def test_bad_inputs_name_the_fix(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    # a FLUX.2 folder under model.kind=qwen-image
    flux2 = make_tiny_flux2_pipeline(tmp_path / "flux2")
    with pytest.raises(ValueError, match="not a QwenImageTransformer2DModel: pass a pipeline folder"):
        GRPOTrainer(run_config("qwen-image", flux2, world["emb"], "mixgrpo"))
    # an editing pipeline's folder: refused by class, in one CLI line
    edit = tmp_path / "edit"
    edit.mkdir()
    index = json.loads((world["pipe"] / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    for args, message in [
        (["preprocess", "--model", str(edit), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "e")],
         "supported pipelines (text-to-image)"),
        (["preprocess", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "e")],
         "is not a diffusers pipeline folder"),
        (["sample", "--checkpoint", str(flux2), "--image-size", "16", "--embeddings", str(world["emb"]),
          "--prompt", PROMPTS[0], "--out", str(tmp_path / "o.png")], "preprocess with its pipeline"),
        (["sample", "--checkpoint", str(world["pipe"]), "--image-size", "18", "--prompt", PROMPTS[0],
          "--out", str(tmp_path / "o.png")], "must be a multiple of 4"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output
    # CFG without negative embeddings; a guidance-distilled transformer diffusers cannot run
    parts = load_diffusers_model("qwen-image", world["pipe"], image_size=SIDE)
    cond = parts.conditions(world["emb"])(PROMPTS)
    with pytest.raises(ValueError, match="needs negative-prompt embeddings"):
        parts.model.velocity(_noise(), torch.full((3,), 0.5), QwenImageCondition(cond.prompt_embeds, cond.prompt_mask),
                             4.0)
    parts.transformer.register_to_config(guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        QwenImageVelocityModel(parts.transformer, LATENT)

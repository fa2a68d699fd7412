"""Wan: ``model.kind=wan`` against diffusers' ``WanPipeline`` on a tiny random text-to-video
pipeline built offline (tests/tiny_pipelines.py): UMT5 text encoder, a video VAE compressing
time by 4 and space by 4, 16 px 5-frame videos (latents (4, 2, 4, 4)), 6 Euler steps, float32
on the CPU.

Measured here (max |difference|, 2-core CPU):

* our deterministic Euler sampler through ``load_diffusers_model`` and `mixgrpo preprocess`
  embeddings vs ``WanPipeline`` (its own ``encode_prompt``, ``FlowMatchEulerDiscreteScheduler``
  with Wan's shift 3 and its sigmas, the same initial latents, ``output_type="latent"``): 0.0 at
  guidance 1, 0.0 at true CFG 5, and 0.0 in Wan2.2 TI2V-5B's layout (per-token timesteps,
  residual VAE) at CFG 5: bitwise, so that is asserted;
* our VAE decode of those latents vs the pipeline's ``output_type="pt"`` videos: 1.2e-6 at
  guidance 1, 1.1e-6 at CFG 5, 5.4e-7 for TI2V (we decode one clip at a time, the pipeline the
  batch, and rescale [-1, 1] -> [0, 1] as (x + 1) / 2), asserted <= 1e-5;
* exports vs the trained model's velocity: see tests/tiny_backbones.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from mixgrpo.cli import app  # noqa: E402
from mixgrpo.core.sampler import flash_plan, mixed_plan, sample  # noqa: E402
from mixgrpo.core.steps import SDENoise  # noqa: E402
from mixgrpo.inference.diffusers_models import load_diffusers_model, scheduler_shift  # noqa: E402
from mixgrpo.inference.evaluate import evaluate_policy  # noqa: E402
from mixgrpo.inference.generate import generate_prompts  # noqa: E402
from mixgrpo.inference.policy import load_policy  # noqa: E402
from mixgrpo.text.preprocess import load_embeddings, preprocess_prompts  # noqa: E402
from mixgrpo.train.presets import PRESETS, make_preset  # noqa: E402
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
from tiny_pipelines import make_tiny_wan_pipeline  # noqa: E402

FRAMES, LATENT_FRAMES, LATENT, LENGTH = 5, 2, 4, 16  # video frames; latent frames and side; text length
VIDEO_REWARDS = "rewards={temporal-consistency: 1.0, per-frame: {weight: 1.0, reward: flatness}}"
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    pipe = make_tiny_wan_pipeline(root / "pipe")
    emb = preprocess_prompts(pipe, PROMPTS, root / "emb", max_sequence_length=LENGTH)
    return {"root": root, "pipe": pipe, "emb": emb}


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PROMPTS), 4, LATENT_FRAMES, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _variant(world, name: str, **index):
    """A copy of the tiny pipeline whose model_index.json says ``index`` (another class, Wan2.2 flags)."""
    folder = world["root"] / name
    if not folder.exists():
        shutil.copytree(world["pipe"], folder)
        meta = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**meta, **index}))
    return folder


def test_preprocess_stores_umt5_states_and_the_empty_negative(world):
    """The pipeline's own form: every prompt at the full length, zero after its tokens, and the
    negative prompt "" per row for CFG."""
    prompts, tensors, index = load_embeddings(world["emb"], expect_dim=16, expect_pooled=None)
    assert prompts == PROMPTS and index["pipeline"] == "WanPipeline"
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeds": (3, LENGTH, 16),
                                                               "negative_embeds": (3, LENGTH, 16)}
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(world["pipe"] / "tokenizer")(PROMPTS, padding="max_length", max_length=LENGTH,
                                                                       truncation=True, return_tensors="pt")
    used = tensors["prompt_embeds"].abs().sum(-1) > 0
    assert torch.equal(used, tokens.attention_mask.bool()) and not used.all()  # zero after each prompt's tokens


@pytest.mark.parametrize("guidance, ti2v", [(1.0, False), (5.0, False), (5.0, True)])
def test_euler_through_our_loader_equals_the_pipeline(world, guidance, ti2v):
    """Also Wan2.2 TI2V-5B's layout (per-token timesteps, a residual VAE over patchified pixels:
    32 px videos give the same 4x4 latents)."""
    folder, side = world["pipe"], SIDE
    if ti2v:
        folder, side = world["root"] / "ti2v", 2 * SIDE
        if not folder.exists():
            make_tiny_wan_pipeline(folder, ti2v=True)
    pipe = diffusers.WanPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # Wan's flow_shift, on an Euler grid
    x1 = _noise()
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=LENGTH)
        call = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=x1, height=side, width=side,
                    num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=guidance, return_dict=False)
        theirs = pipe(**call, output_type="latent")[0]
        videos = pipe(**call, output_type="pt")[0]
    sigmas = pipe.scheduler.sigmas.clone()
    parts = load_diffusers_model("wan", folder, image_size=side, frames=FRAMES)
    assert parts.model.expand_timesteps == ti2v and parts.video and parts.latent_size == LATENT
    cond = parts.conditions(world["emb"])(PROMPTS)
    with torch.no_grad():
        ours = sample(lambda x, t: parts.model.velocity(x, t, cond, guidance), x1,
                      mixed_plan(sigmas.double(), [], "euler")).x0
    diff = (ours - theirs).abs().max().item()
    assert diff == 0.0, f"max |ours - WanPipeline| = {diff:.3g} at guidance {guidance}"
    assert (theirs - x1).abs().max() > 0.1
    decoded = parts.decode(ours)
    assert decoded.shape == videos.shape == (3, FRAMES, 3, side, side)
    diff = (decoded - videos.float()).abs().max().item()
    assert diff <= 1e-5, f"max |our decode - WanPipeline videos| = {diff:.3g}"


def test_pipeline_folder_samples_videos_and_saves_strips(world, tmp_path, monkeypatch):
    """A pipeline folder samples at Wan's scheduler shift (UniPC's flow_shift) as videos; `mixgrpo
    sample` saves each as a strip of frames."""
    assert scheduler_shift(world["pipe"], LATENT) == 3.0
    policy = load_policy(world["pipe"], image_size=SIDE, frames=FRAMES, cache_dir=tmp_path)
    assert policy.kind == "wan" and policy.video and policy.shift == 3.0
    videos = generate_prompts(policy, policy.conditions(PROMPTS), PROMPTS, steps=2, guidance=5.0,
                              decode=policy.decode, shift=policy.shift)
    assert videos.shape == (3, FRAMES, 3, SIDE, SIDE) and videos.min() >= 0 and videos.max() <= 1
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["sample", "--checkpoint", str(world["pipe"]), "--image-size", "16", "--frames", "5",
                                 "--steps", "2", "--embeddings", str(world["emb"]), "--out", str(tmp_path / "grid.png"),
                                 "--images-dir", str(tmp_path / "each")])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(tmp_path / "each" / "00000.png").size == (FRAMES * SIDE, SIDE)  # one strip per video
    assert Image.open(tmp_path / "grid.png").size[0] == FRAMES * SIDE * 4  # a strip per row, upscaled 4x


def test_lora_switched_off_is_the_base_bitwise(world):
    parts = load_diffusers_model("wan", world["pipe"], image_size=SIDE, frames=FRAMES)
    adapted = check_lora_off_is_base(parts, parts.conditions(world["emb"])(PROMPTS), _noise(2), (5.0,))
    assert {n.split(".")[2] for n in adapted} == {"attn1", "attn2"}  # self- and cross-attention


@pytest.mark.parametrize("preset", ["mixgrpo", "mixgrpo-flash"])
def test_grpo_on_videos_trains_only_the_adapter_and_exports(world, preset, tmp_path):
    trainer = train_lora("wan", world["pipe"], world["emb"], preset, tmp_path / "run", f"model.frames={FRAMES}",
                         VIDEO_REWARDS, "sampler.guidance=5")
    batch = trainer.rollout(0)
    assert batch.images.shape == (6, FRAMES, 3, SIDE, SIDE) and batch.images.min() >= 0 and batch.images.max() <= 1
    assert batch.rollout.transitions.x.shape[1:] == (6, 4, LATENT_FRAMES, LATENT, LATENT)  # 5-D SDE transitions
    assert (tmp_path / "run" / "samples" / "after_00002.png").is_file()
    if preset == "mixgrpo":
        check_exports("wan", diffusers.WanPipeline, world["pipe"], tmp_path / "run", trainer, tmp_path)


def test_core_sampling_is_shape_agnostic():
    """A MixGRPO-Flash rollout (ODE, an SDE window with log-probs, DPM-Solver++ tail) on video
    latents (B, C, F, H, W) is the same rollout on them reshaped to (B, C F, H, W), bitwise: the
    sampler, its noise and its per-sample means never look at the layout."""
    plan = flash_plan(8, [1, 2], compression=0.5, shift=3.0, order=2)
    x1 = torch.randn(4, 4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))

    def run(x, w):
        return sample(lambda z, t: torch.tanh(z * w) - t.view(-1, *[1] * (z.ndim - 1)) * z, x, plan,
                      SDENoise("flow_grpo", 0.7), generator=torch.Generator().manual_seed(2))

    video, flat = run(x1, weight), run(x1.flatten(1, 2), weight.flatten(0, 1))
    assert torch.equal(video.x0.flatten(1, 2), flat.x0)
    assert torch.equal(video.transitions.x_next.flatten(2, 3), flat.transitions.x_next)
    assert torch.equal(video.transitions.log_prob, flat.transitions.log_prob)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_steps_on_videos(world, preset):
    """One iteration of each preset on 5-D latents moves the adapter (trees, pruning, forward losses)."""
    base = make_preset(preset)
    extra = [*(["sampler.prune_keep=2", "sampler.prune_offsets=[1]", "group_size=4"]
               if base.sampler.prune_keep is not None else []),
             *(["schedule.size=3"] if base.schedule.name == "stratified" else []),
             *(["sampler.tree_splits=[0, 3]", "group_size=4"] if base.sampler.tree_splits else [])]
    trainer = GRPOTrainer(run_config("wan", world["pipe"], world["emb"], preset, f"model.frames={FRAMES}",
                                     VIDEO_REWARDS, "model.lora_rank=4", *extra))
    before = [p.detach().clone() for p in trainer.params]
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_bf16_lora_with_gradient_checkpointing_steps(world):
    check_bf16_checkpointed_step("wan", world["pipe"], world["emb"], f"model.frames={FRAMES}", VIDEO_REWARDS)


def test_full_fine_tune_exports_a_transformer_folder(world, tmp_path):
    check_full_fine_tune("wan", world["pipe"], world["emb"], tmp_path, f"model.frames={FRAMES}", VIDEO_REWARDS)


def test_bad_inputs_name_the_fix(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    wan = ("wan", world["pipe"], world["emb"], "mixgrpo")
    with pytest.raises(ValueError, match=r"model.frames: Wan takes 4k \+ 1 frames .* got 8: use 5 or 9"):
        run_config(*wan, "model.frames=8", VIDEO_REWARDS)
    with pytest.raises(ValueError, match=r"scores images .* but this model makes videos; .*per-frame: \{weight: 1, "
                                         r"reward: flatness\}"):
        run_config(*wan, f"model.frames={FRAMES}")  # the tiny runs' default reward is flatness, an image reward
    i2v = _variant(world, "i2v", _class_name="WanImageToVideoPipeline")
    experts = _variant(world, "a14b", transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    for folder, message in [(tmp_path / "nowhere", "not a diffusers pipeline folder"),
                            (i2v, "model.kind=wan takes a text-to-video WanPipeline folder"),
                            (experts, "two-expert Wan2.2 pipeline .* not supported yet: use Wan2.1-T2V or Wan2.2-TI2V-5B")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            GRPOTrainer(run_config("wan", folder, world["emb"], "mixgrpo", f"model.frames={FRAMES}", VIDEO_REWARDS))
    sample = ["sample", "--image-size", "16", "--steps", "2", "--prompt", PROMPTS[0], "--out", str(tmp_path / "o.png")]
    for args, message in [
        (["--checkpoint", str(i2v)], "supported pipelines (text-to-image)"),
        (["--checkpoint", str(i2v)], "(text-to-video): WanPipeline"),
        (["--checkpoint", str(world["pipe"]), "--frames", "8"], "Wan takes 4k + 1 frames"),
        (["--checkpoint", str(experts)], "two-expert Wan2.2 pipeline"),
    ]:
        result = runner.invoke(app, sample + args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output
    result = runner.invoke(app, ["eval", "--checkpoint", str(world["pipe"]), "--image-size", "16", "--frames", "5",
                                 "--embeddings", str(world["emb"]), "--rewards", "flatness", "--steps", "2",
                                 "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 2 and "per-frame: {weight: 1, reward: flatness}" in result.output, result.output
    assert result.output.strip().count("\n") == 0, result.output
    policy = load_policy(world["pipe"], image_size=SIDE, frames=FRAMES, embeddings=world["emb"])

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing the image reward")

    monkeypatch.setattr(policy.model, "velocity", no_sampling)
    with pytest.raises(ValueError, match="per-frame"):
        evaluate_policy(policy, PROMPTS, ["flatness"], steps=2)

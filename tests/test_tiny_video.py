"""The embedded video model (``tiny-video-unet``) on the moving-shapes world: its forward and
CFG, `mixgrpo pretrain --world motion`, MixGRPO training with ``motion-composition`` on it,
`sample` / `eval` of the run, and the one-line refusals. Tiny sizes: 4 frames, widths 8/16/32."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mixgrpo.cli import app
from mixgrpo.inference.generate import noise_shape, pixels_from_samples
from mixgrpo.models.checkpoint import build_embedded, load_embedded, save_embedded
from mixgrpo.models.tiny_dit import TextCondition
from mixgrpo.models.tiny_video import TinyVideoUNet, TinyVideoUNetConfig
from mixgrpo.rewards import register_reward
from mixgrpo.train.backends import make_backend
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.run import train
from mixgrpo.train.trainer import GRPOTrainer
from mixgrpo.world import sample_clips, split_motion_prompts, split_prompts
from tiny_runs import TINY, perturbed_embedded, random_condition, tiny_config

FRAMES = 4  # not 3: a (B, C, F, H, W) vs (B, F, C, H, W) mix-up must fail a shape check
SMALL = {"widths": [8, 16, 32], "heads": 2, "frames": FRAMES}  # 32 px (the world renders >= 24); attention at 8 and 4 px
runner = CliRunner()


@register_reward("test-video-brightness")
class VideoBrightness:
    """Toy video reward with spread on any model: brighter clips are better."""

    video = True

    def __call__(self, videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))


def _randomized(seed: int = 0) -> TinyVideoUNet:
    return perturbed_embedded("tiny-video-unet", SMALL, seed)  # every unit (temporal ones too) acts


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory):
    return str(save_embedded(_randomized(), tmp_path_factory.mktemp("video") / "tiny"))


def test_default_model_is_small_makes_5d_noise_and_starts_at_zero_velocity():
    model = build_embedded("tiny-video-unet", {})
    assert model.num_parameters() * 4 < 8e6  # fp32 safetensors under 8 MB
    assert noise_shape(model.config) == (3, 5, 32, 32)
    x = torch.randn(2, *noise_shape(model.config))
    v = model(x, torch.rand(2), random_condition(2))
    assert v.shape == x.shape and torch.count_nonzero(v) == 0  # zero-initialised head


def test_forward_mixes_frames_and_cfg_combines_both_branches():
    model = _randomized()
    x, t, cond = torch.randn(2, 3, FRAMES, 32, 32), torch.rand(2), random_condition(2)
    with torch.no_grad():
        v = model(x, t, cond)
        other = x.clone()
        other[:, :, 0] += 1.0  # change the first frame only
        moved = model(other, t, cond)
        assert (moved[:, :, -1] - v[:, :, -1]).abs().max() > 1e-4  # the last frame sees the first
        still = x[:, :, :1].expand(-1, -1, FRAMES, -1, -1).contiguous()  # the same image in every frame
        no_mixing = copy.deepcopy(model)
        for unit in [*no_mixing.temporal_down, *no_mixing.temporal_up, no_mixing.temporal_mid]:
            for p in unit.parameters():
                p.zero_()  # every temporal unit back to the identity: only the frame index tells frames apart
        per_frame = no_mixing(still, t, cond)
        assert (per_frame[:, :, 0] - per_frame[:, :, 1]).abs().max() > 1e-4  # frames know their index
        torch.testing.assert_close(model.velocity(x, t, cond, 1.0), v)
        null = model.null_condition(2)
        expected = model(x, t, null) + 3.0 * (v - model(x, t, null))
        torch.testing.assert_close(model.velocity(x, t, cond, 3.0), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expected clips of shape \(B, 3, 4, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32), t, cond)


def test_checkpoint_round_trip_keeps_the_video_architecture(tmp_path):
    model = _randomized()
    folder = save_embedded(model, tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "tiny-video-unet"
    loaded = load_embedded(folder)
    assert isinstance(loaded, TinyVideoUNet) and loaded.config == model.config
    assert loaded.config.frames == FRAMES and loaded.config.world == "motion"
    x, t, cond = torch.randn(1, 3, FRAMES, 32, 32), torch.rand(1), random_condition(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), model(x, t, cond))


def test_clips_decode_frames_first():
    x0 = torch.rand(2, 3, FRAMES, 32, 32) * 2 - 1
    clips = pixels_from_samples(x0)
    assert clips.shape == (2, FRAMES, 3, 32, 32)
    torch.testing.assert_close(clips[:, 1], (x0[:, :, 1] + 1) / 2)


def test_video_config_refuses_bad_fields():
    with pytest.raises(ValueError, match="temporal_kernel must be odd"):
        TinyVideoUNetConfig(temporal_kernel=2)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        TinyVideoUNetConfig(frames=0)


def test_pretrain_cli_motion_writes_a_loadable_video_model(tmp_path):
    out = tmp_path / "base"
    result = runner.invoke(app, ["pretrain", "--world", "motion", "--out", str(out), "--steps", "4", "--batch-size",
                                 "4", "--widths", "8,16,32", "--heads", "2", "--frames", str(FRAMES), "--seed", "1",
                                 "--warmup", "2", "--ema", "0.9"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tiny-video-unet" and config["pretrain"]["world"] == "motion"
    assert config["steps_done"] == 4 and "--world motion --architecture tiny-video-unet" in config["command"]
    assert config["pretrain"]["warmup"] == 2 and config["pretrain"]["ema"] == 0.9
    for name in ("model.safetensors", "loss.png", "samples.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    model = load_embedded(out)
    assert isinstance(model, TinyVideoUNet) and model.config.frames == FRAMES and model.config.widths == (8, 16, 32)


@pytest.mark.slow  # ~8 s; the CLI pretraining test below stays in the default run
def test_pretrain_motion_lowers_the_loss_on_a_fixed_batch(tmp_path):
    from mixgrpo.pretrain import PretrainConfig, pretrain
    from mixgrpo.text import cached_embeddings

    cfg = PretrainConfig(steps=15, batch_size=8, lr=5e-3, warmup=1, seed=1, world="motion",
                         architecture="tiny-video-unet", model={"widths": [8, 16, 32], "heads": 2, "frames": FRAMES})
    model = load_embedded(pretrain(cfg, tmp_path / "base"))
    # a fixed batch of the world: the pretrained EMA beats the zero velocity it started as
    prompts, clips = sample_clips(16, seed=123, frames=FRAMES)
    x0 = clips.transpose(1, 2) * 2 - 1
    t, eps = torch.full((16,), 0.5), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    cond = TextCondition(*cached_embeddings(prompts).lookup(prompts))
    with torch.no_grad():
        v = model(0.5 * x0 + 0.5 * eps, t, cond)
    start, end = (eps - x0).pow(2).mean().item(), (v - (eps - x0)).pow(2).mean().item()
    assert end < 0.8 * start, (start, end)


def test_init_from_an_image_unet_starts_as_it_on_every_frame(tmp_path):
    from mixgrpo.pretrain import _initialise

    torch.manual_seed(0)
    image = build_embedded("tiny-unet", {"widths": [8, 16, 32], "heads": 2})
    with torch.no_grad():
        for p in image.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = save_embedded(image, tmp_path / "image")
    video = build_embedded("tiny-video-unet", SMALL)
    _initialise(video, str(folder))
    x, t, cond = torch.randn(2, 3, FRAMES, 32, 32), torch.rand(2), random_condition(2)
    with torch.no_grad():
        v = video(x, t, cond)
        for k in range(FRAMES):
            torch.testing.assert_close(v[:, :, k], image(x[:, :, k], t, cond), atol=1e-5, rtol=1e-5)
    out = tmp_path / "base"
    result = runner.invoke(app, ["pretrain", "--world", "motion", "--init", str(folder), "--out", str(out), "--steps",
                                 "2", "--batch-size", "2", "--widths", "8,16,32", "--heads", "2", "--frames",
                                 str(FRAMES)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["pretrain"]["init"] == str(folder)
    result = runner.invoke(app, ["pretrain", "--world", "motion", "--init", str(folder), "--out", str(tmp_path / "x"),
                                 "--steps", "2", "--widths", "16,32,64", "--frames", str(FRAMES)])
    assert result.exit_code == 2 and "differ in shape (e.g. stem.weight: (8, 3, 3, 3) vs (16, 3, 3, 3))" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def _video_config(checkpoint: str, preset: str, *extra: str):
    return tiny_config(checkpoint, preset, "iterations=2", "eval_every=2", "eval_prompts=24",
                       "rewards={motion-composition: 1.0, test-video-brightness: 1.0}", *extra)


@pytest.mark.parametrize("preset", ["mixgrpo", pytest.param("mixgrpo-flash", marks=pytest.mark.slow)])
def test_training_a_video_model_moves_weights_and_scores_motion_composition(tmp_path, video_checkpoint, preset):
    cfg = _video_config(video_checkpoint, preset)
    out = tmp_path / preset
    summary = train(cfg, out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("reward_motion-composition" in m for m in metrics)
    assert [e["iteration"] for e in evals] == [0, 2]
    assert all("reward_motion-composition" in e and "exact_motion-composition" in e for e in evals)
    assert evals[0]["n"] == 24 and "reward_composition" not in evals[0]  # the motion world's verifier only
    assert "initial_eval_motion-composition" in summary
    before = load_file(f"{video_checkpoint}/model.safetensors")
    ckpt = json.loads((out / "checkpoints" / "latest.json").read_text())
    after = load_file(str(out / "checkpoints" / ckpt["path"] / "weights.safetensors"))
    moved = [n for n in before if n in after and not torch.equal(before[n], after[n])]
    assert moved, "no weight moved"
    assert (out / "samples" / "after_00002.png").is_file()


def test_prompts_come_from_the_model_world(video_checkpoint):
    cfg = _video_config(video_checkpoint, "mixgrpo")
    backend = make_backend(cfg)
    train_prompts, heldout = split_motion_prompts()
    assert backend.video and backend.train_prompts == train_prompts
    assert backend.eval_prompts == heldout * 2  # 24 evaluation samples: every held-out prompt twice
    assert backend.eval_rewards == ("motion-composition",)
    pooled = make_backend(_video_config(video_checkpoint, "mixgrpo", "prompt_pool=8", "eval_split=train"))
    assert len(pooled.train_prompts) == 8 and set(pooled.train_prompts) <= set(train_prompts)
    assert len(pooled.eval_prompts) == 24 and set(pooled.eval_prompts) == set(pooled.train_prompts)
    image = make_backend(tiny_config(video_checkpoint, "mixgrpo", "rewards={test-train-brightness: 1.0}",
                                     "model.checkpoint=null"), model=build_embedded("tiny-dit", TINY.to_dict()))
    assert not image.video and image.train_prompts == split_prompts()[0]
    assert image.eval_rewards == ("composition", "flatness")


def test_sample_and_eval_read_the_run_and_default_to_its_world(tmp_path, video_checkpoint):
    run = tmp_path / "run"
    train(_video_config(video_checkpoint, "mixgrpo", "iterations=1", "eval_every=1"), run)
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--checkpoint", str(run), "--prompts", "heldout", "--out", str(grid),
                                 "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert grid.is_file()
    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--out", str(report), "--steps", "3",
                                 "--limit", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())["results"][0]
    assert list(data["rewards"]) == ["motion-composition"]
    assert [p["prompt"] for p in data["per_prompt"]] == split_motion_prompts()[1][:4]


def test_an_image_reward_on_the_video_model_is_one_line(tmp_path, video_checkpoint):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--set", f"model.checkpoint={video_checkpoint}",
                                 "--set", "rewards={composition: 1.0}"])
    assert result.exit_code == 2
    assert "reward 'composition' scores images" in result.output and "per-frame" in result.output
    assert not (tmp_path / "r").exists()
    cfg = tiny_config(video_checkpoint, "mixgrpo", "model.checkpoint=null")  # the config cannot know: the model does
    with pytest.raises(ValueError, match="reward 'test-train-brightness' scores images"):
        GRPOTrainer(cfg, model=_randomized())
    result = runner.invoke(app, ["eval", "--checkpoint", video_checkpoint, "--out", str(tmp_path / "e.json"),
                                 "--rewards", "composition", "--steps", "2", "--limit", "1"])
    assert result.exit_code == 2 and "reward 'composition' scores images" in result.output


@pytest.mark.parametrize(("args", "match"), [
    (["--world", "film"], "unknown world 'film'; choose one of image, motion"),
    (["--world", "motion", "--architecture", "tiny-unet"], "use --architecture tiny-video-unet with --world motion"),
    (["--architecture", "tiny-video-unet"], "generates the motion world, not image"),
    (["--world", "motion", "--frames", "0"], "frames must be >= 1"),
    (["--world", "motion", "--ema", "1"], "ema must be in [0, 1)"),
    (["--warmup", "-1"], "warmup must be >= 0 steps"),
])
def test_pretrain_bad_world_flags_fail_with_one_line(tmp_path, args, match):
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert match in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_overrides_keep_the_world_check_for_a_missing_checkpoint(tmp_path):
    # an unreadable checkpoint skips the reward check: loading it says what is wrong, in one line
    cfg = apply_overrides(tiny_config(str(tmp_path / "nowhere"), "mixgrpo"), ["rewards={composition: 1.0}"])
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        make_backend(cfg)

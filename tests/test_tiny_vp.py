"""The embedded U-Net as an epsilon / v-prediction diffusion model (``tiny-vp-unet``):
its schedule and sampling against diffusers' ``DDIMScheduler``, ``mixgrpo pretrain
--parameterization eps|v``, GRPO on it (LoRA only moves the adapter), and the one-line refusals.
Tiny sizes: widths 8/16/32, 32 px."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mixgrpo.cli import app
from mixgrpo.core.vp import scaled_linear_alphas_cumprod, vp_coefficients
from mixgrpo.inference.generate import condition, generate
from mixgrpo.models.checkpoint import build_embedded, load_embedded, save_embedded
from mixgrpo.models.tiny_vp import TinyVPUNet, TinyVPUNetConfig
from mixgrpo.rewards import get_reward
from mixgrpo.text import cached_embeddings
from mixgrpo.train.presets import PRESETS
from mixgrpo.train.trainer import GRPOTrainer
from mixgrpo.world.grammar import heldout_eval_prompts
from tiny_runs import perturbed_embedded, random_condition, tiny_config

diffusers = pytest.importorskip("diffusers")

SMALL = {"widths": [8, 16, 32], "heads": 2}
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
runner = CliRunner()


def _randomized(prediction_type: str = "epsilon", seed: int = 0) -> TinyVPUNet:
    return perturbed_embedded("tiny-vp-unet", {**SMALL, "prediction_type": prediction_type}, seed)


def test_schedule_is_stable_diffusions():
    from diffusers import DDIMScheduler

    ours = scaled_linear_alphas_cumprod()
    theirs = DDIMScheduler(**SD).alphas_cumprod.double()
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="0 < beta_start < beta_end < 1"):
        scaled_linear_alphas_cumprod(1000, 0.02, 0.01)


def tiny_vp_vs_ddim(prediction_type: str, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') samples: our Euler sampler on the model's grid and diffusers' DDIM (eta 0,
    SD1.5's leading spacing with steps_offset 1, set_alpha_to_one) run on ``model.prediction``
    (CFG on the prediction) from the same ``x_T``."""
    from diffusers import DDIMScheduler

    model, cond, steps = _randomized(prediction_type), random_condition(3), 10
    ours = generate(model, cond, steps=steps, guidance=guidance, seed=5, decode=lambda x: x)
    scheduler = DDIMScheduler(**SD, prediction_type=prediction_type, steps_offset=1, set_alpha_to_one=True,
                              clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # generate's noise for seed 5
    null = model.null_condition(3)
    with torch.no_grad():
        for k in scheduler.timesteps:
            ks = torch.full((3,), int(k))
            out = model.prediction(x, ks, cond)
            if guidance != 1.0:
                uncond = model.prediction(x, ks, null)
                out = uncond + guidance * (out - uncond)
            x = scheduler.step(out, k, x, eta=0.0).prev_sample
    return ours, x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_is_ddim_on_the_models_own_prediction(prediction_type, guidance):
    ours, theirs = tiny_vp_vs_ddim(prediction_type, guidance)
    assert theirs.abs().max() > 0.3  # a real image-scale sample, not a collapsed one
    torch.testing.assert_close(ours, theirs, atol=2e-5 * guidance, rtol=0)  # CFG scales the float32 rounding too


def test_velocity_is_the_predictions_flow_velocity():
    """``forward(y, tau)`` is ``eps_hat - x0_hat`` of ``prediction(c y, k)`` at a grid time."""
    model, cond = _randomized(), random_condition(2)
    k = torch.tensor([961, 41])
    tau = model.time_grid(25)[torch.tensor([0, 23])].float()
    a, s, c = (v.float().view(-1, 1, 1, 1) for v in vp_coefficients(tau.double()))
    y = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eps = model.prediction(c * y, k, cond)
        v = model(y, tau, cond)
    torch.testing.assert_close(v, eps - (c * y - s * eps) / a, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # ~7 s each; the refusals below run the flag through the CLI by default
@pytest.mark.parametrize(("flag", "prediction_type"), [("eps", "epsilon"), ("v", "v_prediction")])
def test_pretrain_cli_writes_a_vp_model_and_lowers_its_loss(tmp_path, flag, prediction_type):
    out = tmp_path / "base"
    result = runner.invoke(app, ["pretrain", "--parameterization", flag, "--out", str(out), "--steps", "30",
                                 "--batch-size", "8", "--widths", "16,32", "--heads", "2", "--lr", "2e-3",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tiny-vp-unet" and config["model"]["prediction_type"] == prediction_type
    assert f"--architecture tiny-vp-unet --widths 16,32 --heads 2 --image-size 32 --parameterization {flag}" in \
        config["command"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    model = load_embedded(out)
    assert isinstance(model, TinyVPUNet) and model.schedule.prediction_type == prediction_type


def test_pretrain_noises_as_ddpm():
    """The VP training pair: ``x_k = a_k x0 + s_k eps`` at uniform integer ``k``, target ``eps``
    (v: ``a_k eps - s_k x0``), regressed by ``prediction``; the flow model's pair is unchanged."""
    from mixgrpo.pretrain import _noised

    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    for prediction_type in ("epsilon", "v_prediction"):
        model = _randomized(prediction_type)
        net, x_k, k, target = _noised(model, x0, torch.Generator().manual_seed(1))
        gen = torch.Generator().manual_seed(1)
        k_ref = torch.randint(0, 1000, (4,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = scaled_linear_alphas_cumprod()[k_ref].float().view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        assert net == model.prediction and torch.equal(k, k_ref)
        torch.testing.assert_close(x_k, a * x0 + s * eps)
        torch.testing.assert_close(target, eps if prediction_type == "epsilon" else a * eps - s * x0)
    flow = build_embedded("tiny-unet", SMALL)
    net, x_t, t, target = _noised(flow, x0, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    t_ref = torch.sigmoid(torch.randn(4, generator=gen))
    eps = torch.randn(x0.shape, generator=gen)
    assert net is flow and torch.equal(t, t_ref) and torch.equal(target, eps - x0)
    torch.testing.assert_close(x_t, (1 - t_ref.view(-1, 1, 1, 1)) * x0 + t_ref.view(-1, 1, 1, 1) * eps)


@pytest.mark.parametrize("preset", ["mixgrpo", pytest.param("mixgrpo-flash", marks=pytest.mark.slow)])
def test_lora_grpo_on_the_vp_model_moves_only_the_adapter(vp_checkpoint, preset):
    trainer = GRPOTrainer(tiny_config(vp_checkpoint, preset, "model.lora_rank=4", "sampler.num_steps=10"))
    assert trainer.grid[0] < 1 and float(trainer.grid[-1]) == 0.0  # the model's DDIM grid, not the flow's
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for iteration in range(2):
        trainer.step(iteration)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


@pytest.fixture(scope="module")
def vp_checkpoint(tmp_path_factory):
    return str(save_embedded(_randomized(), tmp_path_factory.mktemp("vp") / "tiny"))


# the reference points run by default; the other presets with `make test-slow` (~2 s each)
REFERENCE_POINTS = ("dance-grpo", "pro-grpo", "mixgrpo", "mixgrpo-flash")


@pytest.mark.parametrize("preset", [p if p in REFERENCE_POINTS else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted(PRESETS)])
def test_every_preset_trains_the_vp_model(vp_checkpoint, preset):
    """One iteration of every preset on the epsilon model: its grid, finite rewards and a step
    that moves the trained weights (LoRA where the preset uses it: AWM, NFT)."""
    trainer = GRPOTrainer(tiny_config(vp_checkpoint, preset, "sampler.num_steps=10"))
    torch.testing.assert_close(trainer.grid, trainer.model.time_grid(10))
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and row["skipped_update"] == 0.0
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trained.items())
    assert all(torch.isfinite(params[n]).all() for n in trained)


def test_eval_and_sample_draw_the_vp_model_on_its_own_grid(vp_checkpoint, tmp_path):
    """`mixgrpo eval` / `sample` on an epsilon checkpoint sample on its DDIM grid from its own
    start (the flow's grid would start at alphabar = 0: non-finite): the per-prompt scores are
    those of images drawn by hand from the model with its hooks."""
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--checkpoint", vp_checkpoint, "--limit", "3", "--steps", "6",
                                 "--rewards", "flatness", "--out", str(out)])
    assert result.exit_code == 0, result.output
    prompts = heldout_eval_prompts()[:3]  # --prompts heldout --limit 3
    images = generate(load_embedded(vp_checkpoint).eval(), condition(cached_embeddings(prompts), prompts), steps=6)
    expected = get_reward("flatness")(images, prompts)
    got = torch.tensor([row["flatness"] for row in json.loads(out.read_text())["results"][0]["per_prompt"]])
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--checkpoint", vp_checkpoint, "--prompt", prompts[0], "--steps", "6",
                                 "--out", str(grid)])
    assert result.exit_code == 0 and grid.stat().st_size > 0, result.output


@pytest.mark.parametrize(("args", "match"), [
    (["--parameterization", "x0"], "--parameterization must be flow, eps or v, got 'x0'"),
    (["--parameterization", "eps", "--world", "motion"], "trains the image world's tiny-vp-unet"),
    (["--parameterization", "eps", "--architecture", "tiny-dit"], "trains the image world's tiny-vp-unet"),
    (["--architecture", "tiny-vp-unet"], "add --parameterization eps (or v)"),
])
def test_pretrain_bad_parameterization_flags_fail_with_one_line(tmp_path, args, match):
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert match in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_config_refuses_bad_schedules():
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction"):
        TinyVPUNetConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="steps_offset must be in"):
        TinyVPUNetConfig(steps_offset=1000)

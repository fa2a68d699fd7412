"""Stable Diffusion: ``model.kind=sd`` against diffusers' ``StableDiffusionPipeline`` and
``StableDiffusionXLPipeline`` sampled with ``DDIMScheduler`` (eta 0), on tiny random pipelines
built offline (tests/tiny_pipelines.py): 16 px images, 8x8 latents, float32 on the CPU. Three
models: ``eps`` (SD1.5-like: epsilon, leading spacing with offset 1, final alpha
``alphas_cumprod[0]``), ``v`` (v-prediction, trailing spacing, ``set_alpha_to_one``) and ``xl``
(SDXL: two CLIPs, pooled embedding and time ids, SDXL's Euler config turned into DDIM).

Measured here (max |difference|, 2-core CPU):

* our Euler sampler on the model's flow-time grid (through ``load_diffusers_model`` and
  `mixgrpo preprocess` embeddings, the same ``x_T``) vs the pipeline's ``output_type="latent"``
  (5 steps): eps 5.7e-6 at guidance 1, 1.0e-5 at CFG 4 (latents up to 25 in size, i.e.
  2-4e-7 relative); v 9.5e-7 and 3.0e-6; xl 5.7e-6 and 1.2e-5. Float32 rounding: DDIM's
  update and ours are the same map written differently. Asserted <= 10x each. The UNet gets the
  pipeline's integer timesteps (asserted exactly);
* the pipeline folder sampled through ``load_policy`` (prompts encoded into the cache, CFG 4
  with the pipeline's own negative prompt) vs the pipeline's ``output_type="pt"`` images from the
  same noise: eps 4.8e-7, v 7.2e-7, xl 4.8e-7 (its VAE with per-channel latent statistics);
  the trainer's own evaluation (its grid and start hooks): 2.7e-7. Asserted <= 7e-6;
* every preset steps on the SD model unchanged (one iteration each, finite, the adapter moves);
* exports vs the trained model's velocity: the adapter through ``load_lora_weights`` and the run
  through ``load_policy`` 0.0 (asserted bitwise), the merged UNet folder 1.9e-6 on velocities up
  to 12 (the folded weights round; asserted <= 3e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from mixgrpo.cli import app  # noqa: E402
from mixgrpo.core.grids import uniform_grid  # noqa: E402
from mixgrpo.core.sampler import flash_plan, initial_noise, mixed_plan, sample  # noqa: E402
from mixgrpo.inference.diffusers_models import load_diffusers_model, make_velocity_model  # noqa: E402
from mixgrpo.inference.generate import generate_prompts, sampling_grid, start_samples  # noqa: E402
from mixgrpo.inference.policy import export_run, load_policy  # noqa: E402
from mixgrpo.models.sd import SDCondition, SDVelocityModel, load_vp_schedule  # noqa: E402
from mixgrpo.text.preprocess import load_embeddings, preprocess_prompts  # noqa: E402
from mixgrpo.train.batch import iteration_generator  # noqa: E402
from mixgrpo.train.presets import PRESETS  # noqa: E402
from mixgrpo.train.trainer import GRPOTrainer  # noqa: E402
from tiny_backbones import (  # noqa: E402
    PROMPTS,
    SIDE,
    check_bf16_checkpointed_step,
    check_lora_off_is_base,
    probe,
    run_config,
    train_lora,
)
from tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd_pipeline, make_tiny_sdxl_pipeline  # noqa: E402

LATENT, STEPS = 8, 5  # latent side; DDIM steps (5 divides 1000, as trailing spacing needs)
MODELS = {"eps": (make_tiny_sd_pipeline, {}),
          "v": (make_tiny_sd_pipeline, {"prediction_type": "v_prediction", "spacing": "trailing", "alpha_to_one": True}),
          "xl": (make_tiny_sdxl_pipeline, {})}
# measured max |ours - pipeline| (see the module doc), per model and guidance; asserted <= 10x
LATENT_DIFF = {("eps", 1.0): 5.7e-6, ("eps", 4.0): 1.0e-5, ("v", 1.0): 9.5e-7, ("v", 4.0): 3.0e-6,
               ("xl", 1.0): 5.7e-6, ("xl", 4.0): 1.2e-5}
# images (decoded, in [0, 1]) from load_policy / trainer.evaluate vs the pipeline's output_type="pt":
# measured eps 4.8e-7, v 7.2e-7, xl 4.8e-7 (CFG 4), trainer 2.7e-7; asserted <= 10x the largest
IMAGE_DIFF = 7e-6
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    out = {}
    for name, (make, options) in MODELS.items():
        pipe = make(root / name, **options)
        out[name] = {"pipe": pipe, "emb": preprocess_prompts(pipe, PROMPTS, root / f"{name}-emb")}
    out["root"] = root
    return out


def _pipeline(world, name: str):
    """The diffusers pipeline of ``name`` with DDIM built from its own scheduler config."""
    cls = diffusers.StableDiffusionXLPipeline if name == "xl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(world[name]["pipe"], local_files_only=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _embeds(cond: SDCondition, xl: bool) -> dict[str, torch.Tensor]:
    out = {"prompt_embeds": cond.prompt_embeds, "negative_prompt_embeds": cond.negative_embeds}
    if xl:
        out.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=cond.negative_pooled)
    return out


def _noise(seed: int = 0, n: int = len(PROMPTS)) -> torch.Tensor:
    return torch.randn(n, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def test_preprocess_is_the_pipelines_encode_prompt(world):
    """SD: CLIP's last states and the "" negative's; SDXL: both CLIPs' penultimate states, the
    pooled projection, and zero negatives (``force_zeros_for_empty_prompt``)."""
    for name in ("eps", "xl"):
        pipe = _pipeline(world, name)
        prompts, tensors, index = load_embeddings(world[name]["emb"])
        assert prompts == PROMPTS and index["max_sequence_length"] == pipe.tokenizer.model_max_length
        with torch.no_grad():
            if name == "eps":
                embeds, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
                theirs = {"prompt_embeds": embeds, "negative_embeds": neg}
            else:
                embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
                theirs = {"prompt_embeds": embeds, "pooled": pooled, "negative_embeds": neg,
                          "negative_pooled": neg_pooled}
                assert not neg.any() and not neg_pooled.any()
        assert set(tensors) == set(theirs)
        assert all(torch.equal(tensors[k], theirs[k]) for k in theirs)
    assert not torch.equal(tensors["prompt_embeds"][0], tensors["prompt_embeds"][2])  # prompts differ in tokens


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("name", list(MODELS))
def test_euler_on_the_flow_path_is_the_pipelines_ddim(world, name, guidance):
    pipe = _pipeline(world, name)
    parts = load_diffusers_model("sd", world[name]["pipe"], image_size=SIDE)
    cond = parts.conditions(world[name]["emb"])(PROMPTS)
    x_t = _noise()
    seen: list[torch.Tensor] = []
    hook = parts.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[1].clone()))
    with torch.no_grad():
        theirs = pipe(**_embeds(cond, name == "xl"), latents=x_t.clone(), height=SIDE, width=SIDE, eta=0.0,
                      num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent", return_dict=False)[0]
        grid = parts.model.time_grid(STEPS)
        y = sample(lambda x, t: parts.model.velocity(x, t, cond, guidance), start_samples(parts.model, x_t, grid),
                   mixed_plan(grid, [], "euler")).x0
        ours = parts.model.final_latents(y)
    hook.remove()
    diff = (ours - theirs).abs().max().item()
    bound = 10 * LATENT_DIFF[name, guidance]
    assert diff <= bound, f"{name}: max |ours - DDIM pipeline| = {diff:.3g} at guidance {guidance} (bound {bound:.2g})"
    assert (theirs - x_t).abs().max() > 1.0  # the loop really moved the latents
    # the UNet saw the pipeline's integer timesteps, in float32, once per step (CFG: one batched pass)
    assert [s.unique().tolist() for s in seen] == [[float(t)] for t in pipe.scheduler.timesteps]
    assert len(seen[0]) == len(PROMPTS) * (2 if guidance > 1 else 1)


def test_grid_and_start_are_ddims(world, tmp_path):
    """The grid is the flow time of DDIM's timesteps, ending at the final alpha's time; the
    start is ``x_T / c(tau_0)``; flow models keep ``uniform_grid`` and ``randn`` (the same tensor).
    An outdated SD1 scheduler config (``steps_offset`` 0, ``clip_sample`` true) is read as
    ``StableDiffusionPipeline`` rewrites it."""
    old = _edited_copy(world, tmp_path, "eps", "scheduler", steps_offset=0, clip_sample=True)
    with pytest.warns(FutureWarning, match="steps_offset"):  # diffusers says it rewrites them
        rewritten = diffusers.StableDiffusionPipeline.from_pretrained(old, local_files_only=True).scheduler.config
    schedule = load_vp_schedule(old)
    assert schedule.steps_offset == rewritten.steps_offset == 1 and not rewritten.clip_sample
    assert torch.equal(schedule.grid(STEPS), load_vp_schedule(world["eps"]["pipe"]).grid(STEPS))
    for name, end in (("eps", "alphas_cumprod[0]"), ("v", "one")):
        schedule = load_vp_schedule(world[name]["pipe"])
        ddim = _pipeline(world, name).scheduler
        ddim.set_timesteps(STEPS)
        ab = ddim.alphas_cumprod.double()
        expected = torch.cat([ab[ddim.timesteps], ddim.final_alpha_cumprod.double().view(1)])
        assert torch.allclose(schedule.grid(STEPS), (1 - expected).sqrt() / (expected.sqrt() + (1 - expected).sqrt()),
                              rtol=0, atol=1e-12)
        assert (schedule.end_time == 0.0) == (end == "one")
    noise = _noise()
    flow = load_diffusers_model("flux", make_tiny_flux_pipeline(world["root"] / "flux"), image_size=SIDE).model
    assert torch.equal(sampling_grid(flow, 6, 3.0), uniform_grid(6, shift=3.0))
    assert start_samples(flow, noise, uniform_grid(6)) is noise


def test_flash_tail_on_a_ddim_grid(world):
    """Flash on a VP grid: the training grid up to the window's end, then a compressed tail
    (fractional timesteps) to the same last time."""
    grid = load_vp_schedule(world["eps"]["pipe"]).grid(25)
    plan = flash_plan(25, [0, 1, 2, 3], 0.3, 3.0, grid=grid)
    assert torch.equal(plan.grid[:5], grid[:5]) and plan.grid[-1] == grid[-1]
    assert plan.kinds == ("sde",) * 4 + ("dpm2",) * 5  # int((25 - 3) * 0.3) = 6 points, as on a flow grid
    assert plan.kinds == flash_plan(25, [0, 1, 2, 3], 0.3, 3.0).kinds
    steps = load_vp_schedule(world["eps"]["pipe"]).timesteps(plan.grid[5:-1].float())
    assert (steps != steps.round()).any() and (steps[1:] < steps[:-1]).all()


@pytest.mark.parametrize("name", ["eps", "v", "xl"])
def test_pipeline_folder_samples_the_pipelines_images(world, name, tmp_path):
    """``load_policy`` on the pipeline folder (prompts encoded now, the DDIM grid, CFG 4) and
    ``generate_prompts`` give the pipeline's images (prompts, negative prompt and noise its own)."""
    policy = load_policy(world[name]["pipe"], image_size=SIDE, cache_dir=tmp_path)
    assert policy.kind == "sd" and policy.base is policy.model and policy.time_grid is not None
    ours = generate_prompts(policy, policy.conditions(PROMPTS), PROMPTS, seed=1, steps=STEPS, guidance=4.0,
                            decode=policy.decode, shift=policy.grid_shift(STEPS))
    with torch.no_grad():
        theirs = _pipeline(world, name)(prompt=PROMPTS, latents=_noise(seed=1), height=SIDE, width=SIDE,
                                        num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                                        return_dict=False)[0]
    diff = (ours - theirs.float()).abs().max().item()
    assert diff <= IMAGE_DIFF, f"{name}: max |ours - pipeline images| = {diff:.3g}"
    assert theirs.std() > 0.01  # not a flat image


def test_trainer_evaluates_as_the_pipeline(world):
    """The trainer's grid and start hooks: its rollout starts from ``x_T / c(tau_0)`` on the DDIM
    grid, and its held-out evaluation (a fresh LoRA is the base) draws the pipeline's images from
    the same noise."""
    trainer = GRPOTrainer(run_config("sd", world["eps"]["pipe"], world["eps"]["emb"], "mixgrpo", "model.lora_rank=4"))
    grid = load_vp_schedule(world["eps"]["pipe"]).grid(6)
    assert torch.equal(trainer.grid, grid)
    batch = trainer.rollout(0)
    assert batch.rollout.transitions.step_index[0] == 0  # the window starts at the noisiest step
    s = trainer.cfg.sampler
    x_t = initial_noise(2, 3, (4, LATENT, LATENT), shared=s.shared_noise, generator=iteration_generator(0, 0, 2))
    assert not s.noise_per_group and trainer.cfg.seed == 0
    assert torch.equal(batch.rollout.transitions.x[0], x_t * trainer.model.initial_noise_scale(grid))
    _, ours = trainer.evaluate(seed=3)
    cond = trainer.backend.condition(PROMPTS[:2])
    with torch.no_grad():
        theirs = _pipeline(world, "eps")(**_embeds(cond, False), latents=_noise(3, 2), height=SIDE, width=SIDE,
                                         num_inference_steps=6, guidance_scale=1.0, output_type="pt",
                                         return_dict=False)[0]
    diff = (ours - theirs).abs().max().item()
    assert diff <= IMAGE_DIFF, f"max |trainer.evaluate - pipeline images| = {diff:.3g}"


def test_lora_switched_off_is_the_base_bitwise(world):
    parts = load_diffusers_model("sd", world["xl"]["pipe"], image_size=SIDE)
    check_lora_off_is_base(parts, parts.conditions(world["xl"]["emb"])(PROMPTS), _noise(2), (1.0, 4.0))


def _sd_velocity(world, name: str, unet):
    return make_velocity_model("sd", unet, LATENT, pipeline_dir=world[name]["pipe"], image_size=SIDE)


def _check_exports(world, name: str, run, trainer, tmp) -> None:
    """The adapter through the pipeline's own ``load_lora_weights`` (bitwise), the merged UNet
    folder through ``from_pretrained``, and the run, adapter and merged exports through
    ``load_policy`` all give the trained velocity."""
    cond = trainer.backend.condition(PROMPTS[:2])
    ours = probe(trainer.model, cond)
    adapter = export_run(run, tmp / "adapter", lora="adapter", ema=False)
    pipe = _pipeline(world, name)
    plain = probe(_sd_velocity(world, name, pipe.unet), cond)
    pipe.load_lora_weights(adapter)
    theirs = probe(_sd_velocity(world, name, pipe.unet), cond)
    assert torch.equal(ours, theirs) and (ours - plain).abs().max() > 1e-4
    merged = export_run(run, tmp / "merged", lora="merged", ema=False)
    unet = diffusers.UNet2DConditionModel.from_pretrained(merged / "unet", local_files_only=True)
    assert (probe(_sd_velocity(world, name, unet), cond) - ours).abs().max() <= 3e-6
    for source in (run, adapter, merged):
        policy = load_policy(source, ema=False)
        diff = (probe(policy.model, cond) - ours).abs().max()
        assert policy.kind == "sd" and (diff == 0 if source is not merged else diff <= 3e-6)


@pytest.mark.parametrize(("name", "preset", "extra"), [
    ("eps", "mixgrpo", ()), ("eps", "mixgrpo-flash", ()), ("eps", "dance-grpo", ("sampler.sde_kind=ddim",)),
    ("v", "mixgrpo", ("sampler.num_steps=5",)), ("xl", "mixgrpo", ()), ("xl", "mixgrpo-flash", ()),
])
def test_grpo_trains_only_the_adapter(world, name, preset, extra, tmp_path):
    """Two iterations through the normal trainer move the adapter and leave the UNet bitwise
    (checked by train_lora); DanceGRPO explores with DDIM-eta, its SD path."""
    trainer = train_lora("sd", world[name]["pipe"], world[name]["emb"], preset, tmp_path / "run", *extra)
    batch = trainer.rollout(0)
    assert batch.images.shape == (6, 3, SIDE, SIDE) and batch.images.min() >= 0 and batch.images.max() <= 1
    assert batch.rollout.transitions.t[0] == float(trainer.grid[batch.rollout.transitions.step_index[0]])
    plan, _ = trainer.plan(0)  # the DDIM grid up to the window's end (Flash: then its compressed tail) and its end
    kept = plan.window[-1] + 2
    assert torch.equal(plan.grid[:kept], trainer.grid[:kept]) and plan.grid[-1] == trainer.grid[-1]
    if preset == "mixgrpo" and name != "v":
        _check_exports(world, name, tmp_path / "run", trainer, tmp_path)


# presets whose own structure needs a larger group or grid than run_config's 3 images on 6 steps
PRESET_SIZES = {"branch-grpo": ("group_size=16", "prompts_per_iter=1", "optim.micro_batch=16", "sampler.num_steps=20"),
                "pro-grpo": ("group_size=10", "prompts_per_iter=1", "optim.micro_batch=10", "sampler.num_steps=10"),
                "mixgrpo-pro": ("group_size=10", "prompts_per_iter=1", "optim.micro_batch=10", "sampler.num_steps=10")}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_steps(world, preset):
    """One iteration of every preset, unchanged, on the SD model: finite, and the adapter moves."""
    trainer = GRPOTrainer(run_config("sd", world["eps"]["pipe"], world["eps"]["emb"], preset, "model.lora_rank=4",
                                     "iterations=1", *PRESET_SIZES.get(preset, ())))
    before = [p.detach().clone() for p in trainer.params]
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and not row["skipped_update"]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_bf16_lora_with_gradient_checkpointing_steps(world):
    check_bf16_checkpointed_step("sd", world["xl"]["pipe"], world["xl"]["emb"])


def test_full_fine_tune_exports_a_unet_folder(world, tmp_path):
    cfg = run_config("sd", world["eps"]["pipe"], world["eps"]["emb"], "mixgrpo", "optim.lr=1e-2", "iterations=1",
                     "checkpoint_every=1")
    trainer = GRPOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    from mixgrpo.train.run import train

    train(cfg, tmp_path / "run", trainer=trainer)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    out = export_run(tmp_path / "run", tmp_path / "export", ema=False)
    trainer.model.eval()
    cond = trainer.backend.condition(PROMPTS[:2])
    unet = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    ours = probe(trainer.model, cond)
    assert torch.equal(probe(_sd_velocity(world, "eps", unet), cond), ours)
    assert torch.equal(probe(load_policy(tmp_path / "run", ema=False).model, cond), ours)


def test_cfg_training_runs_two_passes(world):
    trainer = GRPOTrainer(run_config("sd", world["xl"]["pipe"], world["xl"]["emb"], "mixgrpo", "model.lora_rank=4",
                                     "sampler.guidance=4", "iterations=1"))
    row = trainer.step(0)
    assert row["nonfinite_samples"] == 0 and torch.isfinite(torch.tensor(row["loss"]))


def _edited_copy(world, tmp_path, name: str, folder: str, **changes):
    """A copy of pipeline ``name`` whose ``folder`` config (model_index.json at "") is changed."""
    import shutil

    copy = tmp_path / f"{name}-{'-'.join(changes)}"
    shutil.copytree(world[name]["pipe"], copy)
    path = copy / folder / ("scheduler_config.json" if folder == "scheduler" else
                            "model_index.json" if not folder else "config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return copy


def test_bad_inputs_name_the_fix(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    flux = make_tiny_flux_pipeline(tmp_path / "flux")
    # each refusal is one line naming the fix
    for folder, message in [
        (flux, "has no unet/ for model.kind=sd: set model.kind=flux"),
        (_edited_copy(world, tmp_path, "eps", "scheduler", prediction_type="sample"),
         "prediction_type 'sample' is not supported"),
        (_edited_copy(world, tmp_path, "eps", "scheduler", timestep_spacing="linspace"),
         'set "timestep_spacing" to "leading" or "trailing" there'),
        (_edited_copy(world, tmp_path, "xl", "scheduler", clip_sample=True), 'set "clip_sample": false there'),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            GRPOTrainer(run_config("sd", folder, world["eps"]["emb"], "mixgrpo"))
        assert "\n" not in str(err.value)
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    img2img = _edited_copy(world, tmp_path, "eps", "", _class_name="StableDiffusionImg2ImgPipeline")
    sample = ["sample", "--image-size", "16", "--prompt", PROMPTS[0], "--out", str(tmp_path / "o.png")]
    for args, message in [
        (["preprocess", "--model", str(img2img), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "e")],
         "supported pipelines (text-to-image)"),
        (["preprocess", "--model", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "p.txt"), "--out",
          str(tmp_path / "e")], "is not a diffusers pipeline folder"),
        ([*sample, "--checkpoint", str(world["eps"]["pipe"]), "--shift", "3"], "leave out --shift"),
        ([*sample, "--checkpoint", str(world["eps"]["pipe"]), "--embeddings", str(world["xl"]["emb"])],
         "preprocess with its pipeline"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.strip().count("\n") == 0, result.output
    # CFG without negative embeddings; SDXL without its pooled embedding
    parts = load_diffusers_model("sd", world["xl"]["pipe"], image_size=SIDE)
    cond = parts.conditions(world["xl"]["emb"])(PROMPTS)
    t = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="needs negative-prompt embeddings"):
        parts.model.velocity(_noise(), t, SDCondition(cond.prompt_embeds, cond.pooled), 4.0)
    with pytest.raises(ValueError, match="needs the pooled text embedding"):
        parts.model.velocity(_noise(), t, SDCondition(cond.prompt_embeds))
    # UNets that need more than text: an inpainting one (9 input channels), LCM's guidance embedding
    for change, message in [({"in_channels": 9}, "inpainting"), ({"time_cond_proj_dim": 8}, "more than text and time")]:
        unet = load_diffusers_model("sd", world["eps"]["pipe"], image_size=SIDE).transformer
        unet.register_to_config(**change)
        with pytest.raises(ValueError, match=message):
            SDVelocityModel(unet, LATENT, parts.model.schedule, SIDE)

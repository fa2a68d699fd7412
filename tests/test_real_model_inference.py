"""`mixgrpo sample` / `eval` on FLUX and SD3: runs, exports and pipeline folders through
``load_policy``, checked against diffusers' own pipelines and a hand-written blend loop.

Tiny random pipelines (tests/tiny_pipelines.py), 16 px images (8x8 latents), 6 Euler steps,
float32 on the CPU. The runs use ``sampler.shift=scheduler``, so our grid is the pipeline's.
Measured here (max |difference| of images in [0, 1], 2-core CPU):

* blend 0 vs the pipeline's own ``output_type="pt"`` images from the same initial noise:
  2.7e-7 for the LoRA run vs ``FluxPipeline`` + ``load_lora_weights`` of its export, 3.0e-7
  for the FLUX pipeline folder vs the plain pipeline, 5.7e-7 / 6.6e-7 for the SD3 pipeline
  folder at guidance 1 / CFG 4.5 (float32 rounding of the pipelines' sigmas and of their
  [-1, 1] -> [0, 1] rescaling); asserted <= 1e-6;
* blend 1 of the LoRA and the full run vs the pipeline folder at blend 0: 0.0 (bitwise);
* blend 0.25 / 0.5 vs a hand-written two-model Euler loop: 0.0 for LoRA and the full
  fine-tune (asserted <= 1e-6); ``offload=True`` vs ``False``: 0.0 (bitwise);
* an export vs its run: adapter 0.0, merged LoRA 3.6e-7 (asserted <= 1e-5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers")

from mixgrpo.cli import app
from mixgrpo.core.grids import uniform_grid
from mixgrpo.inference.diffusers_export import export_diffusers_run
from mixgrpo.inference.generate import generate_prompts
from mixgrpo.inference.policy import load_policy
from mixgrpo.models.flux import pack_latents
from mixgrpo.text.preprocess import preprocess_prompts
from mixgrpo.train.config import apply_overrides
from mixgrpo.train.presets import make_preset
from mixgrpo.train.run import train
from tiny_pipelines import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

PROMPTS = ["two red circles", "a photo of a cat", "one blue square"]
NEW_PROMPT = "three green triangle"  # in no embeddings folder: the pipeline's encoders encode it
SIDE, LATENT, STEPS, SEED = 16, 8, 6, 1
IMAGE_TOL = 1e-6  # ours vs a pipeline's decoded images (their rescaling rounds differently)
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny FLUX and SD3 pipelines, their embeddings (T5 length 16), a LoRA and a full
    fine-tune FLUX run (2 iterations, large lr), and both exports of the LoRA run."""
    root = tmp_path_factory.mktemp("real-inference")
    flux, sd3 = make_tiny_flux_pipeline(root / "flux"), make_tiny_sd3_pipeline(root / "sd3")
    emb = preprocess_prompts(flux, PROMPTS, root / "emb", max_sequence_length=16)
    sd3_emb = preprocess_prompts(sd3, PROMPTS, root / "sd3-emb", max_sequence_length=16)

    def run(name: str, *extra: str) -> Path:
        cfg = apply_overrides(make_preset("mixgrpo"), [
            "model.kind=flux", f"model.path={flux}", f"model.embeddings={emb}", f"model.image_size={SIDE}",
            "model.flux_guidance=3.5", "sampler.shift=scheduler", "iterations=2", "prompts_per_iter=2",
            "group_size=3", f"sampler.num_steps={STEPS}", "schedule.size=2", "schedule.interval=1", "eval_prompts=2",
            "eval_every=2", "checkpoint_every=2", "optim.micro_batch=6", "rewards={flatness: 1.0}", *extra])
        train(cfg, root / name)
        return root / name

    lora = run("lora", "model.lora_rank=4", "model.lora_alpha=8", "optim.lr=3e-2")
    full = run("full", "model.lora_rank=0", "optim.lr=1e-2")
    adapter = export_diffusers_run(lora, root / "adapter", lora="adapter")
    merged = export_diffusers_run(lora, root / "merged", lora="merged")
    return {"root": root, "flux": flux, "sd3": sd3, "emb": emb, "sd3_emb": sd3_emb, "lora": lora, "full": full,
            "adapter": adapter, "merged": merged, "cache": root / "cache"}


@pytest.fixture(scope="module")
def policies(world):
    """Each source loaded once. ``flux_16``: the pipeline folder with the runs' embeddings, the
    independent base model of the runs."""
    cache = world["cache"]
    return {
        "lora": load_policy(world["lora"]),
        "full": load_policy(world["full"]),
        "flux": load_policy(world["flux"], image_size=SIDE, cache_dir=cache),
        "flux_16": load_policy(world["flux"], image_size=SIDE, embeddings=world["emb"]),
        "sd3": load_policy(world["sd3"], image_size=SIDE, cache_dir=cache),
    }


def _ours(policy, prompts=PROMPTS, blend: float = 0.0, guidance: float = 1.0) -> torch.Tensor:
    return generate_prompts(policy, policy.conditions(prompts), prompts, seed=SEED, steps=STEPS, solver="euler",
                            guidance=guidance, blend=blend, base=policy.base, decode=policy.decode,
                            shift=policy.shift, device=policy.device)


def _noise(channels: int = 4, n: int = len(PROMPTS)) -> torch.Tensor:
    """The initial noise ``generate`` draws for a chunk seeded ``SEED``."""
    return torch.randn(n, channels, LATENT, LATENT, generator=torch.Generator().manual_seed(SEED))


def _flux_pipeline(folder: Path, lora: Path | None = None, max_sequence_length: int = 512) -> torch.Tensor:
    """FluxPipeline's own images (prompts encoded by the pipeline, its scheduler's grid)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    with torch.no_grad():
        return pipe(prompt=PROMPTS, latents=pack_latents(_noise()), height=SIDE, width=SIDE,
                    num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=max_sequence_length,
                    output_type="pt", return_dict=False)[0].float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------- 1. blend 0 = the pipeline
def test_lora_run_at_blend_zero_is_the_flux_pipeline_with_its_exported_lora(world, policies):
    """The run's own embeddings were made at T5 length 16: the pipeline encodes at 16 too."""
    theirs = _flux_pipeline(world["flux"], lora=world["adapter"], max_sequence_length=16)
    ours = _ours(policies["lora"])
    diff = _max_diff(ours, theirs)
    assert diff <= IMAGE_TOL, f"max |ours - FluxPipeline + load_lora_weights| = {diff:.3g}"
    plain = _flux_pipeline(world["flux"], max_sequence_length=16)
    assert (theirs - plain).abs().max() > 1e-3  # the adapter changed the images


def test_flux_pipeline_folder_at_blend_zero_is_the_plain_pipeline(world, policies):
    """No embeddings given: the pipeline folder encodes with its own encoders at FLUX's
    default T5 length (512), as the pipeline does."""
    ours = _ours(policies["flux"])
    diff = _max_diff(ours, _flux_pipeline(world["flux"]))
    assert diff <= IMAGE_TOL, f"max |ours - FluxPipeline| = {diff:.3g}"
    assert policies["flux"].base is policies["flux"].model and policies["flux"].kind == "flux"


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_pipeline_folder_at_blend_zero_is_the_plain_pipeline(world, policies, guidance):
    """SD3 conditions come from `mixgrpo preprocess` (the empty negative prompt's embeddings
    kept for CFG); the pipeline encodes ``negative_prompt=None`` as "" too.

    The grid: ours is ``linspace(1, 0, T + 1)`` shifted (MixGRPO / Flow-GRPO, and FluxPipeline's
    default ``sigmas=linspace(1, 1/T, T)`` + 0). StableDiffusion3Pipeline by default spaces
    its T sigmas from 1 to the scheduler's (shifted) ``sigma_min`` instead, 6 steps ending
    0.43, 0.0089, 0 where ours end 0.6, 0.375, 0, so it is given FLUX's default sigmas,
    which its scheduler shifts (3.0) into our grid."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(world["sd3"], local_files_only=True)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=_noise(), height=SIDE, width=SIDE, num_inference_steps=STEPS,
                      sigmas=np.linspace(1.0, 1 / STEPS, STEPS).tolist(), guidance_scale=guidance,
                      output_type="pt", return_dict=False)[0].float()
    policy = policies["sd3"]
    assert policy.kind == "sd3" and policy.shift == pytest.approx(3.0)
    ours = _ours(policy, guidance=guidance)
    diff = _max_diff(ours, theirs)
    assert diff <= IMAGE_TOL, f"max |ours - StableDiffusion3Pipeline| = {diff:.3g} at guidance {guidance}"


# ---------------------------------------------------------------------------- 2. blend 1 = the base
def test_lora_run_at_blend_one_is_the_base_pipeline_bitwise(policies):
    base_images = _ours(policies["flux_16"])
    blended = _ours(policies["lora"], blend=1.0)
    assert torch.equal(blended, base_images), f"max diff {_max_diff(blended, base_images):.3g}"
    assert _max_diff(_ours(policies["lora"]), base_images) > 1e-3  # training changed the model
    assert torch.equal(_ours(policies["full"], blend=1.0), base_images)


# ---------------------------------------------------------------------------- 3. blends vs a hand loop
def _two_model_loop(policy, base_model, blend: float) -> torch.Tensor:
    """Euler with the trained model for the first T - floor(F T + 1/2) steps, then the base."""
    cond = policy.conditions(PROMPTS)(PROMPTS)
    t = uniform_grid(STEPS, shift=policy.shift).float()  # float32 times and steps, as a pipeline's scheduler
    policy_steps = STEPS - math.floor(blend * STEPS + 0.5)
    x = _noise()
    with torch.no_grad():
        for i in range(STEPS):
            model = policy.model if i < policy_steps else base_model
            v = model.velocity(x, t[i].expand(len(x)), cond, 1.0)
            x = x + (t[i + 1] - t[i]) * v
    return policy.decode(x).cpu()


@pytest.mark.parametrize("blend", [0.25, 0.5])  # 0.25 of 6 = 1.5: half rounds up to 2 base steps
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_blend_equals_a_hand_written_two_model_loop(policies, kind, blend):
    """The base is loaded independently (the pipeline folder), not the policy's own ``base``."""
    policy = policies[kind]
    expected = _two_model_loop(policy, policies["flux_16"].model, blend)
    ours = _ours(policy, blend=blend)
    diff = _max_diff(ours, expected)
    assert diff <= 1e-6, f"{kind}, blend {blend}: max |generate - hand loop| = {diff:.3g}"
    assert _max_diff(ours, _ours(policy)) > 1e-4 and _max_diff(ours, _ours(policy, blend=1.0)) > 1e-4


def test_full_fine_tune_offload_samples_bitwise_the_same(world, policies):
    offloaded = load_policy(world["full"], offload=True)
    assert offloaded.base is not offloaded.model
    for blend in (0.0, 0.5, 1.0):
        assert torch.equal(_ours(offloaded, blend=blend), _ours(policies["full"], blend=blend)), blend


# ---------------------------------------------------------------------------- 4. exports
@pytest.mark.parametrize("export", ["adapter", "merged"])
def test_an_export_samples_what_its_run_samples(world, policies, export, tmp_path, monkeypatch):
    """An export records the base, image size, guidance, shift and the run's text length; with no
    --embeddings its prompts are encoded anew by the pipeline at that length."""
    assert (world[export] / "mixgrpo_export.json").is_file()
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "cache"))
    policy = load_policy(world[export])
    assert policy.kind == "flux" and policy.shift == policies["lora"].shift
    for blend in (0.0, 0.5):
        diff = _max_diff(_ours(policy, blend=blend), _ours(policies["lora"], blend=blend))
        assert diff <= 1e-5, f"{export} export, blend {blend}: max diff {diff:.3g}"
    assert torch.equal(_ours(policy, blend=1.0), _ours(policies["flux_16"]))


# ---------------------------------------------------------------------------- 5. the CLI
def test_eval_cli_table_has_every_column(world, tmp_path, monkeypatch):
    cache = tmp_path / "mixgrpo-cache"
    monkeypatch.setenv("MIXGRPO_CACHE", str(cache))
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join([*PROMPTS[:2], NEW_PROMPT]) + "\n")
    out = tmp_path / "eval" / "result.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(world["lora"]), "--checkpoint", str(world["flux"]),
                                 "--image-size", str(SIDE), "--blend", "0,1", "--rewards", "flatness",
                                 "--steps", str(STEPS), "--prompts", str(prompt_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["checkpoint"], r["blend"]) for r in rows] == [
        (str(world["lora"]), 0), (str(world["lora"]), 1), (str(world["flux"]), 0), (str(world["flux"]), 1)]
    for row in rows:
        assert row["nfe"] == STEPS and row["n"] == 3 and row["seeds"] == 1
        assert set(row["rewards"]["flatness"]) == {"mean", "std", "ci95", "best_of"}
        assert all(math.isfinite(v) for v in row["rewards"]["flatness"].values())
        assert [p["prompt"] for p in row["per_prompt"]] == [*PROMPTS[:2], NEW_PROMPT]
    assert rows[0]["per_prompt"] != rows[1]["per_prompt"]  # blend 1 is the base, not the run
    table = out.with_suffix(".md").read_text().splitlines()
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["checkpoint", "blend", "NFE", "n", "flatness"]
    assert len(table) == 2 + 4
    # the new prompt was encoded once per text length into the monkeypatched cache, nowhere else
    assert len(list((cache / "text" / "diffusers").glob("embeddings-*"))) == 2


def test_sample_cli_writes_the_grid_and_single_images(world, policies, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "mixgrpo-cache"))
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    result = runner.invoke(app, ["sample", "--checkpoint", str(world["lora"]), "--out", str(tmp_path / "grid.png"),
                                 "--prompts", str(prompt_file), "--steps", str(STEPS), "--seed", str(SEED),
                                 "--images-dir", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    expected = (_ours(policies["lora"]).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    for i, name in enumerate(names):
        assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "imgs" / name))), expected[i])


# ---------------------------------------------------------------------------- 6. bad inputs
BAD = [
    (["sample", "--checkpoint", "LORA", "--embeddings", "EMB", "--prompt", NEW_PROMPT], "has no embedding in"),
    (["sample", "--checkpoint", "LORA", "--embeddings", "SD3_EMB", "--prompt", PROMPTS[0]], "this transformer expects"),
    (["eval", "--checkpoint", "LORA", "--embeddings", "SD3_EMB", "--rewards", "flatness"], "this transformer expects"),
    (["sample", "--checkpoint", "LORA", "--prompt", PROMPTS[0], "--blend", "1.5"], "--blend must be in [0, 1]"),
    (["eval", "--checkpoint", "LORA", "--prompts", "P", "--blend", "0,1.5"], "--blend must be in [0, 1]"),
    (["sample", "--checkpoint", "base", "--embeddings", "EMB", "--prompt", PROMPTS[0]],
     "--embeddings applies to FLUX/SD3"),
    (["sample", "--checkpoint", "base", "--image-size", "16", "--prompt", PROMPTS[0]],
     "--image-size applies to FLUX/SD3"),
    (["sample", "--checkpoint", "FLUX", "--prompt", PROMPTS[0]], "needs --image-size"),
    (["eval", "--checkpoint", "SD3", "--prompts", "P", "--rewards", "flatness"], "needs --image-size"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_inputs_fail_with_one_line(world, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIXGRPO_CACHE", str(tmp_path / "mixgrpo-cache"))
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    names = {"LORA": world["lora"], "EMB": world["emb"], "SD3_EMB": world["sd3_emb"], "FLUX": world["flux"],
             "SD3": world["sd3"], "P": tmp_path / "p.txt"}
    args = [str(names.get(a, a)) for a in args]
    result = runner.invoke(app, [*args, "--steps", "2", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0, result.output
    assert not (tmp_path / "o.png").exists()


def test_embedded_runs_and_flux_runs_are_told_apart(world, policies, tmp_path):
    """A run folder's model.kind picks the loader: an embedded run still loads (and blends)
    through the embedded path, ``base`` still samples, FLUX sources are FLUX policies."""
    from tiny_runs import make_tiny_checkpoint, tiny_config

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    train(tiny_config(checkpoint, "mixgrpo", "iterations=2", "eval_every=2", "model.lora_rank=4", "optim.lr=3e-2"),
          tmp_path / "embedded-run")
    embedded = load_policy(tmp_path / "embedded-run")
    assert embedded.kind == "embedded" and embedded.decode is None
    prompts = ["two red circles", "one yellow triangle"]
    images = {b: generate_prompts(embedded, embedded.conditions(prompts), prompts, steps=STEPS, blend=b,
                                  base=embedded.base) for b in (0.0, 1.0)}
    assert not torch.equal(images[0.0], images[1.0])
    base = load_policy("base")
    assert base.kind == "embedded"
    out = generate_prompts(base, base.conditions(prompts), prompts, steps=STEPS)
    assert out.shape[:2] == (2, 3) and torch.isfinite(out).all()
    for name in ("lora", "full", "adapter", "merged"):
        assert load_policy(world[name], embeddings=world["emb"]).kind == "flux", name
    assert policies["lora"].kind == policies["full"].kind == "flux"



@pytest.mark.parametrize("source", ["lora", "full"])
def test_bfloat16_weights_sample_what_float32_samples_up_to_bf16_rounding(world, policies, source):
    """``--dtype bfloat16`` (a run's default when it trained in bf16): the transformer in bf16,
    a LoRA adapter kept in fp32 as in training; images within bf16 rounding of the fp32 ones.
    Measured max |diff| (mean): LoRA 0.0098 (0.0017), where only the frozen base is rounded;
    full fine-tune 0.063 (0.011), every weight rounded; bounded at 1.5x those."""
    policy = load_policy(world[source], dtype="bfloat16")
    transformer = policy.model.transformer
    assert transformer.dtype == torch.bfloat16
    lora = [p.dtype for n, p in transformer.named_parameters() if "lora_" in n]
    assert all(d == torch.float32 for d in lora) and (source == "full" or lora)
    for blend in (0.0, 0.5):
        low, full = _ours(policy, blend=blend), _ours(policies[source], blend=blend)
        worst, bound = _max_diff(low, full), {"lora": 0.015, "full": 0.095}[source]
        assert 0 < worst <= bound, f"{source}, blend {blend}: bf16 vs fp32 max |diff| {worst:.3g}"
    with pytest.raises(ValueError, match="--dtype must be float32 or bfloat16"):
        load_policy(world[source], dtype="float16")

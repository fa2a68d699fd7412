"""The ``mixgrpo`` command line: thin wrappers over the library."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GRPO for flow-matching text-to-image models.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """GRPO for flow-matching text-to-image models: pretrain, train, sample, eval, bench."""


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False, markup=True)
    raise typer.Exit(2)


def _note(message: str) -> None:
    console.print(f"[yellow]note:[/yellow] {message}", soft_wrap=True, highlight=False, markup=True)


def _command_line(command: str, **params) -> str:
    """The exact command that reproduces a run: every resolved option, spelled out."""
    parts = ["mixgrpo", command]
    for name, value in params.items():
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


# each U-Net's default channels per level
_UNET_WIDTHS = {"tiny-unet": "32,64,128", "tiny-video-unet": "16,32,64", "tiny-vp-unet": "32,64,128"}
_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}  # --parameterization -> a tiny-vp-unet's prediction type


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Output folder for the checkpoint, loss curve and sample grid.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes (saves what it has).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images (motion: clips) per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 6e-4,
    warmup: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up (then cosine to 10%).")] = 200,
    ema: Annotated[float, typer.Option(help="EMA decay of the saved weights (0.999 averages about the last 1000 steps).")] = 0.999,
    world: Annotated[str, typer.Option(help="image (the text-to-image grammar) or motion (moving-shapes clips, a video model).")] = "image",
    architecture: Annotated[str | None, typer.Option(help="tiny-unet (the shipped base) or tiny-dit (the first round's); motion: tiny-video-unet. Default: the world's U-Net.")] = None,
    widths: Annotated[str | None, typer.Option(help="tiny-unet / tiny-video-unet: channels per level, comma-separated (default 32,64,128 / 16,32,64).")] = None,
    width: Annotated[int, typer.Option(help="tiny-dit: transformer width.")] = 128,
    depth: Annotated[int, typer.Option(help="tiny-dit: transformer blocks.")] = 5,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    frames: Annotated[int, typer.Option(help="tiny-video-unet: frames per clip.")] = 5,
    parameterization: Annotated[str, typer.Option(help="flow (rectified flow, the shipped base) or eps / v: the U-Net as an SD-style diffusion model predicting epsilon or v (tiny-vp-unet).")] = "flow",
    init: Annotated[str | None, typer.Option(help="Start from a model folder's weights where names and shapes match ('base': the shipped image base; a tiny-video-unet with --widths 32,64,128 then starts as it on every frame).")] = None,
    prompts: Annotated[str, typer.Option(help="all (every prompt of the world, the shipped base) or train (held-out pairs never seen).")] = "all",
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (about 2x faster on CPU).")] = True,
    seed: Annotated[int, typer.Option(help="Seed for data, init and noise.")] = 0,
) -> None:
    """Rectified-flow pretraining of the embedded model on a procedural world."""
    from .pretrain import PretrainConfig, check_init
    from .pretrain import pretrain as run_pretrain

    if parameterization not in ("flow", *_PREDICTIONS):
        _fail(f"pretrain: --parameterization must be flow, eps or v, got {parameterization!r}")
    if parameterization != "flow" and (world != "image" or architecture not in (None, "tiny-vp-unet")):
        _fail(f"pretrain: --parameterization {parameterization} trains the image world's tiny-vp-unet; drop "
              "--architecture and --world")
    if parameterization == "flow" and architecture == "tiny-vp-unet":
        _fail("pretrain: tiny-vp-unet is a diffusion model; add --parameterization eps (or v)")
    default = "tiny-video-unet" if world == "motion" else "tiny-unet" if parameterization == "flow" else "tiny-vp-unet"
    architecture = architecture or default
    unet = architecture in _UNET_WIDTHS
    widths = (widths or _UNET_WIDTHS[architecture]) if unet else None
    try:
        if unet:
            if not all(w.strip().isdigit() for w in widths.split(",")):
                raise ValueError(f"--widths must be comma-separated channel counts such as 32,64,128, got {widths!r}")
            model = {"widths": [int(w) for w in widths.split(",")], "heads": heads, "image_size": image_size}
            if architecture == "tiny-video-unet":
                model["frames"] = frames
            if architecture == "tiny-vp-unet":
                model["prediction_type"] = _PREDICTIONS[parameterization]
        else:
            model = {"width": width, "depth": depth, "heads": heads, "image_size": image_size}
        cfg = PretrainConfig(steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, warmup=warmup, ema=ema, seed=seed, init=init,
                             architecture=architecture, model=model, prompts=prompts, bf16=bf16, world=world)
        check_init(cfg)
    except (ValueError, FileNotFoundError) as err:
        _fail(f"pretrain: {err}")
    command = _command_line("pretrain", out=out, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr,
                            warmup=warmup, ema=ema, world=world, architecture=architecture, widths=widths,
                            width=width if architecture == "tiny-dit" else None,
                            depth=depth if architecture == "tiny-dit" else None, heads=heads, image_size=image_size,
                            frames=frames if architecture == "tiny-video-unet" else None,
                            parameterization=None if parameterization == "flow" else parameterization, init=init, prompts=prompts,
                            seed=seed)
    with Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("pretrain", total=steps, loss="-")
        folder = run_pretrain(cfg, out, command=command,
                              on_step=lambda s, loss: progress.update(task, completed=s + 1, loss=f"{loss:.4f}"))
    console.print(f"wrote {folder}/model.safetensors, config.json, loss.png, samples.png")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder (refused if it already holds a run, unless --resume).")],
    preset: Annotated[str, typer.Option(help="Method preset: mixgrpo, mixgrpo-flash, mixgrpo-flash-star, flow-grpo, dance-grpo.")] = "mixgrpo",
    config: Annotated[Path | None, typer.Option(help="YAML file of config values, applied on top of the preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one value: --set optim.lr=3e-4 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
) -> None:
    """GRPO fine-tuning with one of the method presets."""
    from .train.config import apply_overrides, config_from_dict, config_to_dict, load_yaml
    from .train.distributed import elastic_restart_count
    from .train.presets import make_preset
    from .train.run import TrainingFailed, TrainingInterrupted, check_run_dir
    from .train.run import train as run_train

    try:
        cfg = make_preset(preset)
        if config is not None:
            data = config_to_dict(cfg)
            _merge(data, load_yaml(str(config)))
            cfg = config_from_dict(data).validate()
        cfg = apply_overrides(cfg, list(set_ or []))
        if elastic_restart_count() == 0:  # a torchrun restart resumes by itself (see train.run)
            check_run_dir(out, resume)
    except ValueError as err:
        _fail(str(err))
    columns = (TextColumn("iter"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    try:
        with Progress(*columns, console=console, disable=not main_rank) as progress:
            task = progress.add_task("train", total=cfg.iterations, info="evaluating base...")

            def show(row: dict) -> None:
                progress.update(task, completed=row["iteration"] + 1, info=(
                    f"reward {row['reward_mean']:.3f}  window {row['window_start']}  {row['iter_time_s']:.1f}s/it"))

            summary = run_train(cfg, out, resume=resume, on_iteration=show)
    except TrainingInterrupted as stop:  # every rank stops at the same iteration: rank 0 says it
        if main_rank:
            console.print(f"[yellow]interrupted:[/yellow] {stop}", soft_wrap=True, highlight=False)
        raise typer.Exit(128 + stop.signum) from None
    except TrainingFailed as err:  # the run is kept: the line says what happened and how to resume
        console.print(f"[red]failed:[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if main_rank:
        console.print_json(data=summary)
        console.print(f"samples: {out / 'samples'}  curves: {out / 'reward_curve.png'}, {out / 'eval_curve.png'}")


def _parse_blends(blend: str) -> list[float]:
    try:
        values = [float(b) for b in blend.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--blend takes numbers in [0, 1] (e.g. 0.2 or 0,0.1,0.2), got {blend!r}") from None
    bad = [b for b in values if not 0 <= b <= 1]
    if not values or bad:
        raise ValueError(f"--blend must be in [0, 1] (0.2 = MixGRPO's 80/20), got {blend!r}")
    return values


EmbeddingsOpt = Annotated[str | None, typer.Option(help="FLUX/SD3: a `mixgrpo preprocess` folder holding the prompts (alone: all of its prompts). Default: the run's, else the pipeline's text encoders encode them once.")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="FLUX/SD3: pixels per side (default: the run's or export's).")]
FluxGuidanceOpt = Annotated[float | None, typer.Option(help="FLUX.1 / FLUX.2 distilled guidance (default: the run's, else the pipeline's: 3.5 FLUX.1, 4 FLUX.2).")]
DeviceOpt = Annotated[str, typer.Option(help="FLUX/SD3: where the model samples (cpu, cuda, cuda:N).")]
OffloadOpt = Annotated[bool, typer.Option(help="FLUX/SD3 full fine-tunes: keep the policy and its base on the CPU in turn while the other samples (for --blend).")]
DtypeOpt = Annotated[str | None, typer.Option(help="FLUX/SD3: float type of the weights, float32 or bfloat16 (default: the run's model.dtype, else float32).")]
FramesOpt = Annotated[int | None, typer.Option(help="Wan: video frames, 4k + 1 (default: the run's or export's, else 81).")]
ShiftOpt = Annotated[float | None, typer.Option(help="Time shift of the sampling grid (default: 3 for the embedded model; the run's, else the scheduler's, for FLUX/SD3/Wan; SD samples on its DDIM timesteps, no shift).")]


def _diffusers_options(embeddings, image_size, flux_guidance, device, offload, dtype, frames=None) -> dict:
    return {"embeddings": embeddings, "image_size": image_size, "flux_guidance": flux_guidance, "device": device,
            "offload": offload, "dtype": dtype, "frames": frames}


def _load_prompts(prompt: list[str] | None, prompts: str | None, limit: int | None = None,
                  embeddings: str | None = None, world: str = "image") -> list[str]:
    from .data import read_prompt_file

    if not prompt and not prompts and embeddings:  # every prompt of a preprocess folder
        from .text.preprocess import load_embeddings

        prompts_in, _, _ = load_embeddings(embeddings)
        return prompts_in[:limit] if limit else prompts_in
    if bool(prompt) == bool(prompts):
        raise ValueError("pass either --prompt TEXT (repeatable) or --prompts FILE (or, for FLUX/SD3, --embeddings "
                         "FOLDER), not both or neither")
    if prompts == "heldout":  # the held-out prompts of the world the model generates
        from .world import get_world

        chosen = get_world(world).heldout()
    else:
        chosen = list(prompt) if prompt else read_prompt_file(prompts)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        chosen = chosen[:limit]
    return chosen


@app.command()
def sample(
    out: Annotated[Path, typer.Option(help="Image grid PNG to write (videos: one strip of frames per prompt).")],
    checkpoint: Annotated[str, typer.Option(help="'base', a model/adapter folder, or a `mixgrpo train` run folder.")] = "base",
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt file: .txt (one per line), .json or .jsonl with a 'prompt' field; or 'heldout'.")] = None,
    steps: Annotated[int, typer.Option(help="ODE steps.")] = 25,
    solver: Annotated[str, typer.Option(help="ODE solver: euler, dpm2 or dpm3 (DPM-Solver++).")] = "euler",
    blend: Annotated[float, typer.Option(help="Final fraction of steps run with the base model (0.2 = MixGRPO's 80/20).")] = 0.0,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    images_dir: Annotated[Path | None, typer.Option(help="Also write each image (video: its strip of frames) as its own PNG in this folder.")] = None,
    embeddings: EmbeddingsOpt = None,
    image_size: ImageSizeOpt = None,
    flux_guidance: FluxGuidanceOpt = None,
    device: DeviceOpt = "cpu",
    offload: OffloadOpt = False,
    shift: ShiftOpt = None,
    dtype: DtypeOpt = None,
    frames: FramesOpt = None,
) -> None:
    """Generate images (Wan: videos) with a checkpoint: a captioned grid (and single PNGs on request)."""
    from .inference.generate import generate_prompts
    from .inference.policy import load_policy
    from .viz import save_image_grid, save_images

    try:
        # 'heldout' means the held-out prompts of the model's world: read once the model is known
        chosen = _load_prompts(prompt, prompts, embeddings=embeddings) if prompts != "heldout" else []
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        _parse_blends(str(blend))
        policy = load_policy(checkpoint, on_note=_note,
                             **_diffusers_options(embeddings, image_size, flux_guidance, device, offload, dtype, frames))
        if prompts == "heldout":
            chosen = _load_prompts(prompt, prompts, world=_world_name(policy))
        policy.check_guidance(cfg)
        policy.check_shift(shift)
        images = generate_prompts(policy, policy.conditions(chosen), chosen, seed=seed, steps=steps, solver=solver,
                                  guidance=cfg, blend=blend, base=policy.base, decode=policy.decode,
                                  shift=policy.grid_shift(steps) if shift is None else shift, device=policy.device)
        save_image_grid(out, images, chosen)
        if images_dir is not None:
            save_images(images_dir, images)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    console.print(f"wrote {out}" + (f" and {len(chosen)} images in {images_dir}" if images_dir else ""))


@app.command(name="eval")
def eval_(
    out: Annotated[Path, typer.Option(help="JSON file to write (a Markdown table goes beside it).")],
    checkpoint: Annotated[list[str] | None, typer.Option(help="'base', a model/adapter folder or a run folder (repeatable).")] = None,
    prompts: Annotated[str, typer.Option(help="Prompt file (.txt, .json, .jsonl) or 'heldout' (the model's world's: the 256 held-out prompts training evaluates on; moving shapes: its 12).")] = "heldout",
    rewards: Annotated[str | None, typer.Option(help="Comma-separated reward names (default: the model's world's verifiers, composition,flatness or motion-composition).")] = None,
    blend: Annotated[str, typer.Option(help="Base-model blend fraction(s), e.g. 0.2 or 0,0.1,0.2,0.3.")] = "0",
    seeds: Annotated[int, typer.Option(help="Samples per prompt (scores are averaged per prompt).")] = 1,
    steps: Annotated[int, typer.Option(help="ODE steps.")] = 25,
    solver: Annotated[str, typer.Option(help="ODE solver: euler, dpm2 or dpm3.")] = "euler",
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off).")] = 1.0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    embeddings: EmbeddingsOpt = None,
    image_size: ImageSizeOpt = None,
    flux_guidance: FluxGuidanceOpt = None,
    device: DeviceOpt = "cpu",
    offload: OffloadOpt = False,
    shift: ShiftOpt = None,
    dtype: DtypeOpt = None,
    frames: FramesOpt = None,
    reward_options: Annotated[Path | None, typer.Option(help="YAML file: reward name -> its constructor options, e.g. {hps: {path: HPS_v2.1_compressed.pt, tokenizer: DIR}} (a training config's rewards: section works too).")] = None,
) -> None:
    """Score checkpoints on a prompt set: mean, std, 95% CI per reward, and per-prompt scores."""
    import json

    from .inference.evaluate import EvalProgress, build_rewards, evaluate_policy, markdown_table
    from .inference.policy import load_policy
    from .train.config import load_yaml
    from .train.distributed import dist_from_environment

    try:
        d = dist_from_environment(device)  # under torchrun: this rank's process and device; prompts are sharded
        device = d.device if d.enabled else device
        world_prompts = prompts == "heldout" and not embeddings  # the model's world's: once it is loaded
        chosen = [] if world_prompts else _load_prompts(None, None if embeddings else prompts, limit, embeddings)
        blends = _parse_blends(blend)
        if seeds < 1 or steps < 1:
            raise ValueError(f"--seeds and --steps must be >= 1, got {seeds} and {steps}")
        names = [r.strip() for r in rewards.split(",") if r.strip()] if rewards is not None else []
        if rewards is not None and not names:
            raise ValueError("--rewards is empty; name at least one reward, e.g. composition")
        reward_specs = load_yaml(str(reward_options)) if reward_options is not None else None
        scorers = build_rewards(names, reward_specs) if names else {}  # a bad name fails before any model loads
        options = _diffusers_options(embeddings, image_size, flux_guidance, device, offload, dtype, frames)
        policies = [load_policy(c, on_note=_note, **options) for c in (checkpoint or ["base"])]
        if world_prompts or rewards is None:
            worlds = sorted({_world_name(p) for p in policies})
            if len(worlds) > 1:
                raise ValueError(f"the checkpoints generate different worlds ({', '.join(worlds)}): evaluate them "
                                 "separately, or pass --prompts FILE and --rewards")
            if world_prompts:
                chosen = _load_prompts(None, prompts, limit, world=worlds[0])
            if rewards is None:
                from .world import get_world

                names = list(get_world(worlds[0]).eval_rewards)
                scorers = build_rewards(names, reward_specs)
        for policy in policies:
            policy.check_shift(shift)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        _fail(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    # an interrupted evaluation left its finished parts in OUT.partial: the same command continues
    job = {"prompts": chosen, "rewards": names, "blends": blends, "seeds": seeds, "steps": steps, "solver": solver,
           "cfg": cfg, "shift": shift, "policies": [[p.name, p.source] for p in policies]}
    # rank 0 keeps the progress file; every rank starts from the parts it holds
    progress_file = EvalProgress(out.with_name(out.name + ".partial"), job) if d.is_main else None
    finished = _share(progress_file.snapshot() if progress_file is not None else None, d)
    if progress_file is not None and progress_file.resumed:
        _note(f"continuing the interrupted evaluation in {progress_file.path} ({progress_file.resumed} parts done)")
    results = []
    total = len(policies) * len(blends) * seeds * len(chosen)
    shard = {"shard": (d.rank, d.world_size), "gather": _gatherer(d)} if d.enabled else {}
    try:
        # transient: a prompt a reward refuses mid-run still ends in one line, no bar above it
        with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, transient=True, disable=not d.is_main) as progress:
            task = progress.add_task("eval", total=total, info="")
            for i, policy in enumerate(policies):
                for b in blends:
                    progress.update(task, info=f"{policy.name} blend {b:g}")
                    where = f"{i}:{b!r}"
                    save = (lambda key, part, where=where: progress_file.add(where, key, part)) if progress_file else None
                    results.append(evaluate_policy(
                        policy, chosen, scorers, blend=b, seeds=seeds, steps=steps, solver=solver, guidance=cfg, shift=shift,
                        on_images=lambda k: progress.advance(task, k), done=dict(finished.get(where, {})),
                        on_part=save, **shard))
    except KeyboardInterrupt:
        scored = int(progress.tasks[0].completed) if progress.tasks else 0
        where = progress_file.path if progress_file is not None else out.with_name(out.name + ".partial")
        console.print(f"[yellow]interrupted:[/yellow] eval stopped after {scored} of {total} images; the finished "
                      f"parts are kept in {where}; run the same command again to continue",
                      soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    except ValueError as err:
        _fail(str(err))
    if progress_file is None:  # another rank: rank 0 writes the result
        return
    table = markdown_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": prompts, "steps": steps, "solver": solver, "cfg": cfg, "results": results}, indent=1) + "\n")
    if len(results) > 1:
        out.with_suffix(".md").write_text(table)
    progress_file.remove()
    console.print(table, highlight=False, markup=False, soft_wrap=True)  # a Markdown row is never wrapped
    console.print(f"wrote {out}" + (f" and {out.with_suffix('.md')}" if len(results) > 1 else ""), soft_wrap=True)


def _world_name(policy) -> str:
    """The procedural world a policy's model generates (:func:`~mixgrpo.world.world_of`)."""
    from .world import world_of

    return world_of(policy.config).name


def _gatherer(d):
    """``obj -> [rank 0's obj, rank 1's, ...]`` over the torchrun process group."""
    import torch.distributed as tdist

    def gather(obj):
        everyone = [None] * d.world_size
        tdist.all_gather_object(everyone, obj)
        return everyone

    return gather


def _share(obj, d):
    """Rank 0's ``obj`` on every rank (itself in a single process)."""
    if not d.enabled:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="A `mixgrpo train` run folder.")],
    out: Annotated[Path, typer.Option(help="New folder for the exported weights.")],
    lora: Annotated[str, typer.Option(help="For LoRA runs: 'merged' (standalone model) or 'adapter' (peft format).")] = "merged",
) -> None:
    """Save a run's weights as a standalone model folder (or a peft adapter)."""
    from .inference.policy import export_run

    try:
        folder = export_run(run, out, lora=lora, on_note=_note)
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    console.print(f"wrote {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="New folder for bench.json, bench.md and the plots.")],
    presets: Annotated[str | None, typer.Option(help="Comma-separated presets (default: dance-grpo, mixgrpo, mixgrpo-flash, mixgrpo-flash-star); preset[key=value;...] adds a variant with its own overrides; 'frontier' = dance-grpo, flow-grpo, mixgrpo, mixgrpo-flash-star, flow-grpo-guard, nft, awm, branch-grpo.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per preset (default 3; --quick 1).")] = None,
    iterations: Annotated[int | None, typer.Option(help="Iterations per run (default 40; --quick 8).")] = None,
    quick: Annotated[bool, typer.Option(help="Small groups and evaluation, 8 iterations: a few minutes here.")] = False,
    ablate: Annotated[str | None, typer.Option(help="Instead of presets: 'window' (w, s, schedule), 'flash-steps' or 'ovf' (Pro-GRPO's subset vs full group).")] = None,
    evals: Annotated[int | None, typer.Option(help="Held-out evaluations per run, evenly spaced (default 2; --quick 2).")] = None,
    flux_shaped: Annotated[bool, typer.Option(help="GPU mode: a random FLUX-architecture transformer at real width (costs and peak memory only).")] = False,
    flux_blocks: Annotated[str, typer.Option(help="With --flux-shaped: double,single block counts (FLUX.1: 19,38).")] = "2,2",
    flux_heads: Annotated[int, typer.Option(help="With --flux-shaped: attention heads of 128 dims (FLUX.1: 24 = hidden 3072).")] = 24,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a value in every arm (repeatable).")] = None,
) -> None:
    """Run methods (or MixGRPO ablations) side by side: cost, reward, time to DanceGRPO's reward."""
    from .bench import BenchInterrupted, FluxShape, plan_bench, run_bench, split_presets

    try:
        names = split_presets(presets) if presets else None
        shape = None
        if flux_shaped:
            blocks = flux_blocks.split(",")
            if len(blocks) != 2 or not all(b.strip().isdigit() for b in blocks):
                raise ValueError(f"--flux-blocks wants 'double,single' block counts like 2,2, got {flux_blocks!r}")
            shape = FluxShape(int(blocks[0]), int(blocks[1]), flux_heads).validate()
        plan = plan_bench(out, presets=names, seeds=seeds, iterations=iterations, quick=quick, ablate=ablate,
                          overrides=list(set_ or []), evals=evals, flux_shape=shape)
    except ValueError as err:
        _fail(str(err))
    total = len(plan.arms) * plan.seeds * plan.iterations
    try:
        with Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("bench", total=total, info="evaluating the start...")

            def show(label: str, iteration: int) -> None:
                progress.update(task, advance=1, info=f"{label} iter {iteration + 1}")

            if plan.resume:
                _note(f"continuing the interrupted bench in {out}")
            rows = run_bench(plan, on_progress=show)
    except BenchInterrupted as stop:
        console.print(f"[yellow]interrupted:[/yellow] {stop}", soft_wrap=True, highlight=False)
        raise typer.Exit(128 + stop.signum) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the last saved round is kept
        console.print(f"[yellow]interrupted:[/yellow] bench stopped at once; its last saved round is kept in "
                      f"{plan.state_dir}; run the same command again to continue", soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    except ValueError as err:
        _fail(str(err))
    console.print((out / "bench.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {out}/bench.json, bench.md, reward_vs_time.png, reward_vs_iteration.png ({len(rows)} rows)")


@app.command()
def preprocess(
    model: Annotated[Path, typer.Option(help="Local diffusers pipeline folder (FLUX.1, FLUX.2, SD3/SD3.5, Qwen-Image, SD1.x/2.x, SDXL or Wan text-to-video).")],
    prompts: Annotated[str, typer.Option(help="Prompt file: .txt (one per line), .json or .jsonl with a 'prompt' field.")],
    out: Annotated[Path, typer.Option(help="New folder for the embedding shards and index.json.")],
    max_sequence_length: Annotated[int | None, typer.Option(help="Text tokens (default: FLUX.1, FLUX.2, Qwen-Image, Wan 512; SD3 256; SD/SDXL: always CLIP's 77).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per encoder batch.")] = 16,
) -> None:
    """Precompute text embeddings with the pipeline's own encoders (offline, safetensors shards)."""
    from .data import read_prompt_file
    from .text.preprocess import pipeline_class, preprocess_prompts

    try:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        chosen = read_prompt_file(prompts)
        pipeline_class(model)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; choose a new --out (preprocess never overwrites embeddings)")
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    try:
        with Progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("preprocess", total=len(chosen))
            folder = preprocess_prompts(model, chosen, out, max_sequence_length=max_sequence_length,
                                        batch_size=batch_size, on_batch=lambda k: progress.advance(task, k))
    except (ValueError, FileNotFoundError, OSError) as err:
        _fail(str(err))
    console.print(f"wrote {folder}: {len(chosen)} prompts")


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "rewards":
            _merge(base[key], value)
        else:
            base[key] = value


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

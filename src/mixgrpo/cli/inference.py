"""``sample`` and ``eval``: images and held-out scores of any checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import app, console, fail, note


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
    from ..data import read_prompt_file

    if not prompt and not prompts and embeddings:  # every prompt of a preprocess folder
        from ..text.preprocess import load_embeddings

        prompts_in, _, _ = load_embeddings(embeddings)
        return prompts_in[:limit] if limit else prompts_in
    if bool(prompt) == bool(prompts):
        raise ValueError("pass either --prompt TEXT (repeatable) or --prompts FILE (or, for FLUX/SD3, --embeddings "
                         "FOLDER), not both or neither")
    if prompts == "heldout":  # the held-out prompts of the world the model generates
        from ..world import get_world

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
    from ..inference.generate import generate_prompts
    from ..inference.policy import load_policy
    from ..viz import save_image_grid, save_images

    try:
        # 'heldout' means the held-out prompts of the model's world: read once the model is known
        chosen = _load_prompts(prompt, prompts, embeddings=embeddings) if prompts != "heldout" else []
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        _parse_blends(str(blend))
        policy = load_policy(checkpoint, on_note=note,
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
        fail(str(err))
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

    from ..inference.evaluate import EvalProgress, build_rewards, evaluate_policy, markdown_table
    from ..inference.policy import load_policy
    from ..train.config import load_yaml
    from ..train.distributed import dist_from_environment

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
        policies = [load_policy(c, on_note=note, **options) for c in (checkpoint or ["base"])]
        if world_prompts or rewards is None:
            worlds = sorted({_world_name(p) for p in policies})
            if len(worlds) > 1:
                raise ValueError(f"the checkpoints generate different worlds ({', '.join(worlds)}): evaluate them "
                                 "separately, or pass --prompts FILE and --rewards")
            if world_prompts:
                chosen = _load_prompts(None, prompts, limit, world=worlds[0])
            if rewards is None:
                from ..world import get_world

                names = list(get_world(worlds[0]).eval_rewards)
                scorers = build_rewards(names, reward_specs)
        for policy in policies:
            policy.check_shift(shift)
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        fail(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    # an interrupted evaluation left its finished parts in OUT.partial: the same command continues
    job = {"prompts": chosen, "rewards": names, "blends": blends, "seeds": seeds, "steps": steps, "solver": solver,
           "cfg": cfg, "shift": shift, "policies": [[p.name, p.source] for p in policies]}
    # rank 0 keeps the progress file; every rank starts from the parts it holds
    progress_file = EvalProgress(out.with_name(out.name + ".partial"), job) if d.is_main else None
    finished = _share(progress_file.snapshot() if progress_file is not None else None, d)
    if progress_file is not None and progress_file.resumed:
        note(f"continuing the interrupted evaluation in {progress_file.path} ({progress_file.resumed} parts done)")
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
        fail(str(err))
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
    from ..world import world_of

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

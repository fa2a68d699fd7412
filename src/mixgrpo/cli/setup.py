"""``pretrain`` and ``preprocess``: the embedded model, and text embeddings for real pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import app, command_line, console, fail

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
    """Pretrain the embedded model on a procedural world (rectified flow, or --parameterization eps / v)."""
    from ..pretrain import PretrainConfig, check_init
    from ..pretrain import pretrain as run_pretrain

    if parameterization not in ("flow", *_PREDICTIONS):
        fail(f"pretrain: --parameterization must be flow, eps or v, got {parameterization!r}")
    if parameterization != "flow" and (world != "image" or architecture not in (None, "tiny-vp-unet")):
        fail(f"pretrain: --parameterization {parameterization} trains the image world's tiny-vp-unet; drop "
              "--architecture and --world")
    if parameterization == "flow" and architecture == "tiny-vp-unet":
        fail("pretrain: tiny-vp-unet is a diffusion model; add --parameterization eps (or v)")
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
        fail(f"pretrain: {err}")
    command = command_line("pretrain", out=out, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr,
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
def preprocess(
    model: Annotated[Path, typer.Option(help="Local diffusers pipeline folder (FLUX.1, FLUX.2, SD3/SD3.5, Qwen-Image, SD1.x/2.x, SDXL or Wan text-to-video).")],
    prompts: Annotated[str, typer.Option(help="Prompt file: .txt (one per line), .json or .jsonl with a 'prompt' field.")],
    out: Annotated[Path, typer.Option(help="New folder for the embedding shards and index.json.")],
    max_sequence_length: Annotated[int | None, typer.Option(help="Text tokens (default: FLUX.1, FLUX.2, Qwen-Image, Wan 512; SD3 256; SD/SDXL: always CLIP's 77).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per encoder batch.")] = 16,
) -> None:
    """Precompute text embeddings with the pipeline's own encoders (offline, safetensors shards)."""
    from ..data import read_prompt_file
    from ..text.preprocess import pipeline_class, preprocess_prompts

    try:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        chosen = read_prompt_file(prompts)
        pipeline_class(model)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; choose a new --out (preprocess never overwrites embeddings)")
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    try:
        with Progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("preprocess", total=len(chosen))
            folder = preprocess_prompts(model, chosen, out, max_sequence_length=max_sequence_length,
                                        batch_size=batch_size, on_batch=lambda k: progress.advance(task, k))
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
    console.print(f"wrote {folder}: {len(chosen)} prompts")

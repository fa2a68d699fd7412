"""The ``mixgrpo`` command line: thin wrappers over the library."""

from __future__ import annotations

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


def _command_line(command: str, **params) -> str:
    """The exact command that reproduces a run: every resolved option, spelled out."""
    parts = ["mixgrpo", command]
    for name, value in params.items():
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Output folder for the checkpoint, loss curve and sample grid.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 4000,
    minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes (saves what it has).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 6e-4,
    width: Annotated[int, typer.Option(help="Transformer width.")] = 128,
    depth: Annotated[int, typer.Option(help="Transformer blocks.")] = 5,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for data, init and noise.")] = 0,
) -> None:
    """Rectified-flow pretraining of the tiny DiT on the procedural world."""
    from .models.tiny_dit import TinyDiTConfig
    from .pretrain import PretrainConfig
    from .pretrain import pretrain as run_pretrain

    try:
        cfg = PretrainConfig(
            steps=steps, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed,
            model=TinyDiTConfig(image_size=image_size, width=width, depth=depth, heads=heads),
        )
    except ValueError as err:
        _fail(str(err))
    command = _command_line("pretrain", out=out, steps=steps, minutes=minutes, batch_size=batch_size, lr=lr,
                            width=width, depth=depth, heads=heads, image_size=image_size, seed=seed)
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
    from .train.presets import make_preset
    from .train.run import check_run_dir
    from .train.run import train as run_train

    try:
        cfg = make_preset(preset)
        if config is not None:
            data = config_to_dict(cfg)
            _merge(data, load_yaml(str(config)))
            cfg = config_from_dict(data).validate()
        cfg = apply_overrides(cfg, list(set_ or []))
        check_run_dir(out, resume)
    except ValueError as err:
        _fail(str(err))
    columns = (TextColumn("iter"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=cfg.iterations, info="evaluating base...")

            def show(row: dict) -> None:
                progress.update(task, completed=row["iteration"] + 1, info=(
                    f"reward {row['reward_mean']:.3f}  window {row['window_start']}  {row['iter_time_s']:.1f}s/it"))

            summary = run_train(cfg, out, resume=resume, on_iteration=show)
    except ValueError as err:
        _fail(str(err))
    console.print_json(data=summary)
    console.print(f"samples: {out / 'samples'}  curves: {out / 'reward_curve.png'}, {out / 'eval_curve.png'}")


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

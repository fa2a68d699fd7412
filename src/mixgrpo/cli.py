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
    console.print(f"[red]error:[/red] {message}")
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


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

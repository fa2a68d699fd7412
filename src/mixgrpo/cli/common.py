"""What every command shares: the typer app, the console and the one-line errors."""

from __future__ import annotations

import shlex

import typer
from rich.console import Console

__all__ = ["app", "command_line", "console", "fail", "note"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GRPO for flow-matching text-to-image models.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """GRPO for flow-matching text-to-image models: pretrain, train, sample, eval, bench."""


def fail(message: str) -> None:
    """Print ``error: message`` (one line) and exit with status 2."""
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False, markup=True)
    raise typer.Exit(2)


def note(message: str) -> None:
    console.print(f"[yellow]note:[/yellow] {message}", soft_wrap=True, highlight=False, markup=True)


def command_line(command: str, **params) -> str:
    """The exact command that reproduces a run: every resolved option, spelled out."""
    parts = ["mixgrpo", command]
    for name, value in params.items():
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)

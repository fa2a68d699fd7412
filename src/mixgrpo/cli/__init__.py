"""The ``mixgrpo`` command line: thin wrappers over the library, one module per group of
commands (``setup``: pretrain, preprocess; ``training``: train, export, bench; ``inference``:
sample, eval), all on the one typer ``app`` of :mod:`.common`."""

from __future__ import annotations

from . import inference, setup, training  # noqa: F401  (each registers its commands on the app)
from .common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

"""``train``, ``export`` and ``bench``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import app, console, fail, note


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder (refused if it already holds a run, unless --resume).")],
    preset: Annotated[str, typer.Option(help="Method preset: mixgrpo, mixgrpo-flash, mixgrpo-flash-star, flow-grpo, dance-grpo.")] = "mixgrpo",
    config: Annotated[Path | None, typer.Option(help="YAML file of config values, applied on top of the preset.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one value: --set optim.lr=3e-4 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
) -> None:
    """GRPO fine-tuning with one of the method presets."""
    from ..train.config import apply_overrides, config_from_dict, config_to_dict, load_yaml
    from ..train.distributed import elastic_restart_count
    from ..train.presets import make_preset
    from ..train.run import TrainingFailed, TrainingInterrupted, check_run_dir
    from ..train.run import train as run_train

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
        fail(str(err))
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
        fail(str(err))
    if main_rank:
        console.print_json(data=summary)
        console.print(f"samples: {out / 'samples'}  curves: {out / 'reward_curve.png'}, {out / 'eval_curve.png'}")


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "rewards":
            _merge(base[key], value)
        else:
            base[key] = value


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="A `mixgrpo train` run folder.")],
    out: Annotated[Path, typer.Option(help="New folder for the exported weights.")],
    lora: Annotated[str, typer.Option(help="For LoRA runs: 'merged' (standalone model) or 'adapter' (peft format).")] = "merged",
) -> None:
    """Save a run's weights as a standalone model folder (or a peft adapter)."""
    from ..inference.policy import export_run

    try:
        folder = export_run(run, out, lora=lora, on_note=note)
    except (ValueError, FileNotFoundError, OSError) as err:
        fail(str(err))
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
    from ..bench import BenchInterrupted, FluxShape, plan_bench, run_bench, split_presets

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
        fail(str(err))
    total = len(plan.arms) * plan.seeds * plan.iterations
    try:
        with Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("bench", total=total, info="evaluating the start...")

            def show(label: str, iteration: int) -> None:
                progress.update(task, advance=1, info=f"{label} iter {iteration + 1}")

            if plan.resume:
                note(f"continuing the interrupted bench in {out}")
            rows = run_bench(plan, on_progress=show)
    except BenchInterrupted as stop:
        console.print(f"[yellow]interrupted:[/yellow] {stop}", soft_wrap=True, highlight=False)
        raise typer.Exit(128 + stop.signum) from None
    except KeyboardInterrupt:  # a second Ctrl-C: the last saved round is kept
        console.print(f"[yellow]interrupted:[/yellow] bench stopped at once; its last saved round is kept in "
                      f"{plan.state_dir}; run the same command again to continue", soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    except ValueError as err:
        fail(str(err))
    console.print((out / "bench.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {out}/bench.json, bench.md, reward_vs_time.png, reward_vs_iteration.png ({len(rows)} rows)")

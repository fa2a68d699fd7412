"""`mixgrpo bench`: methods (or MixGRPO ablations) side by side in one interleaved run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arms import ABLATIONS, DEFAULT_PRESETS, QUICK, ablation_arms, preset_arms, split_presets
from .report import write_report
from .runner import Arm, ArmResult, BenchInterrupted, run_arms, saved_round
from .synthetic import FluxShape, flux_shaped_overrides, make_flux_shaped

__all__ = ["ABLATIONS", "DEFAULT_PRESETS", "Arm", "ArmResult", "BenchInterrupted", "BenchPlan", "FluxShape", "plan_bench", "run_arms",
           "run_bench", "split_presets"]


# the default bench: every arm x seed evaluated on the whole held-out split, so arms can be
# compared prompt by prompt (paired differences to DanceGRPO in the report)
DEFAULT = {"presets": DEFAULT_PRESETS, "seeds": 3, "iterations": 40, "evals": 2, "overrides": ["eval_prompts=396"]}


@dataclass
class BenchPlan:
    """A validated bench: the arms and how long to run them."""

    out: Path
    arms: list[Arm]
    seeds: int
    iterations: int
    evals: int
    title: str
    config: dict[str, Any]
    flux_shape: FluxShape | None = None  # build the FLUX-shaped model in out/model before running
    resume: bool = False  # out holds an interrupted bench of this same plan: continue it

    @property
    def state_dir(self) -> Path:
        """Where the interrupted bench's rounds are saved (removed once the report is written)."""
        return self.out / "resume"


def plan_bench(
    out: str | Path,
    *,
    presets: list[str] | None = None,
    seeds: int | None = None,
    iterations: int | None = None,
    quick: bool = False,
    ablate: str | None = None,
    overrides: list[str] | None = None,
    evals: int | None = None,
    flux_shape: FluxShape | None = None,
) -> BenchPlan:
    """Check every input and build the arms (nothing runs, nothing is written).

    Defaults (:data:`DEFAULT`): the four presets of :data:`DEFAULT_PRESETS`, 3 seeds, 40
    iterations, 2 evaluations on all 396 held-out prompts (about 50 minutes alone on 2 cores);
    ``quick`` shrinks them (:data:`QUICK`). With
    ``flux_shape`` every arm trains a FLUX-shaped random transformer instead (GPU mode, see
    :mod:`mixgrpo.bench.synthetic`): 1 seed, 5 iterations, costs only."""
    out = Path(out)
    base = QUICK if quick else DEFAULT
    if flux_shape is not None:
        flux_shape.validate()
        sizes = [o for o in base["overrides"] if not o.startswith("eval_prompts")] if quick else []
        base = {**base, "seeds": 1, "iterations": 5, "evals": 1,
                "overrides": [*flux_shaped_overrides(out / "model"), *sizes]}
    seeds = seeds if seeds is not None else base["seeds"]
    iterations = iterations if iterations is not None else base["iterations"]
    evals = evals if evals is not None else base["evals"]
    if seeds < 1 or iterations < 1 or evals < 1:
        raise ValueError(f"--seeds, --iterations and evaluations must be >= 1, got {seeds}, {iterations}, {evals}")
    shared = [*base["overrides"], *(overrides or [])]
    if ablate is not None:
        if presets:
            raise ValueError("--ablate compares MixGRPO variants; drop --presets")
        arms, title = ablation_arms(ablate, shared, base.get("group")), f"MixGRPO ablation: {ablate}"
    else:
        arms, title = preset_arms(presets or base["presets"], shared, base.get("group")), "Methods side by side"
    if flux_shape is not None:
        title += (f" (FLUX-shaped: hidden {flux_shape.hidden_size}, {flux_shape.double_blocks} double + "
                  f"{flux_shape.single_blocks} single blocks, random weights: costs only, rewards are meaningless)")
    config = {"arms": [a.label for a in arms], "seeds": seeds, "iterations": iterations, "evals": evals,
              "overrides": shared, "quick": quick, "quick_group": base.get("group"), "ablate": ablate,
              "flux_shape": None if flux_shape is None else dataclasses.asdict(flux_shape)}
    plan = BenchPlan(out, arms, seeds, iterations, evals, title, config, flux_shape)
    if out.exists() and any(out.iterdir()):
        saved = saved_round(plan.state_dir)
        if saved is None or saved.get("config") != json.loads(json.dumps(config)):
            raise ValueError(f"{out} is not empty; choose a new --out (a bench never overwrites results; an "
                             "interrupted bench continues only with the same command)")
        plan.resume = True
    return plan


def run_bench(plan: BenchPlan, on_progress: Callable[[str, int], None] | None = None) -> list[dict[str, Any]]:
    """Run the plan's arms interleaved and write the report; returns its rows. Rounds are saved
    in ``plan.state_dir`` as it goes: an interrupted bench (:class:`BenchInterrupted`, or a
    crash) continues from the last saved round when the same command runs again."""
    if plan.flux_shape is not None and not plan.resume:
        make_flux_shaped(plan.out / "model", plan.flux_shape)
    results = run_arms(plan.arms, list(range(plan.seeds)), plan.iterations, evals=plan.evals, on_progress=on_progress,
                       state_dir=plan.state_dir, config=json.loads(json.dumps(plan.config)))
    rows = write_report(plan.out, results, title=plan.title, config=plan.config)
    shutil.rmtree(plan.state_dir, ignore_errors=True)
    return rows

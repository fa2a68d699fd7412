"""Turn interleaved bench results into ``bench.json``, ``bench.md`` and two plots.

Confidence intervals are over seeds (Student t, ``n - 1`` degrees of freedom); with one seed
they are ``null``. Iteration time is the median over every iteration of every seed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..train.config import EVAL_SPLITS
from ..viz import save_curve
from .runner import ArmResult

__all__ = ["PAPER_ITER_TIME_S", "crossing_time", "mean_ci", "paired_difference", "summarise", "time_to_reference",
           "write_report"]

# MixGRPO paper (arXiv 2507.21802 v7, Table 1), FLUX on 32 GPUs: seconds per training iteration
# (NFE sampling/training: DanceGRPO 25/14, MixGRPO 25/4, Flash 16/4, Flash* 8/4)
PAPER_ITER_TIME_S = {"dance-grpo": 291.3, "mixgrpo": 149.3, "mixgrpo-flash": 112.4, "mixgrpo-flash-star": 83.3}
REFERENCE = "dance-grpo"


def mean_ci(values: list[float]) -> dict[str, float | None]:
    """Mean and 95% half-width (Student t over ``len(values)`` seeds; None for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None}
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "ci95": half}


def paired_difference(runs: list[ArmResult], reference: list[ArmResult]) -> dict[str, Any] | None:
    """Final held-out ``composition`` of ``runs`` minus ``reference``'s, paired by seed and prompt.

    With ``d[s, p]`` the difference for seed ``s`` and prompt ``p`` (same prompts, same
    evaluation noise, the same training seed in both arms):

    - ``seeds``: mean over seeds of ``mean_p d[s, p]`` with a Student-t 95% half-width over
      seeds (the training randomness; ``None`` with one seed);
    - ``prompts_ci95``: the 95% half-width over prompts of ``mean_s d[s, p]`` (the evaluation
      noise alone, for the seeds run).

    ``None`` when the evaluations carry no per-prompt scores (not the embedded world).
    """
    by_seed = {r.seed: r.evals[-1][2].get("per_prompt") for r in reference}
    pairs = [(r.evals[-1][2].get("per_prompt"), by_seed.get(r.seed)) for r in runs]
    if not pairs or any(a is None or b is None or len(a) != len(b) for a, b in pairs):
        return None
    per_seed = [statistics.fmean(x - y for x, y in zip(a, b, strict=True)) for a, b in pairs]
    per_prompt = [statistics.fmean(a[p] - b[p] for a, b in pairs) for p in range(len(pairs[0][0]))]
    half = 1.96 * statistics.stdev(per_prompt) / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else None
    return {"seeds": mean_ci(per_seed), "prompts_ci95": half, "prompts": len(per_prompt)}


def crossing_time(run: ArmResult, target: float) -> float | None:
    """Training seconds at which ``run``'s held-out reward first reaches ``target``, linearly
    interpolated between the evaluations around the crossing; ``None`` if it never does."""
    points = [(sec, row["reward_mean"]) for _, sec, row in run.evals]
    for k, (sec, reward) in enumerate(points):
        if reward >= target:
            if k == 0:
                return sec
            sec0, r0 = points[k - 1]
            return sec0 + (target - r0) / (reward - r0) * (sec - sec0)
    return None


def time_to_reference(runs: list[ArmResult], reference: list[ArmResult]) -> dict[str, Any] | None:
    """Time to DanceGRPO's final held-out reward as a fraction of DanceGRPO's own time to it,
    paired by seed: for seed ``s`` the target is DanceGRPO's final reward of seed ``s``, and
    ``ratio_s = t_arm(target) / t_dance(target)``. Seeds where DanceGRPO ended no higher than
    it started define no target and are left out (``undefined``); seeds where the arm never
    reached it count in ``never``. Mean and Student-t 95% half-width over the rest."""
    by_seed = {r.seed: r for r in reference}
    ratios, never, undefined = [], 0, 0
    for run in runs:
        ref = by_seed.get(run.seed)
        if ref is None:
            continue
        target = ref.evals[-1][2]["reward_mean"]
        if target <= ref.evals[0][2]["reward_mean"]:
            undefined += 1
            continue
        t_ref, t_arm = crossing_time(ref, target), crossing_time(run, target)
        if t_arm is None:
            never += 1
        else:
            ratios.append(t_arm / t_ref)
    if not ratios and not never:
        return None if not undefined else {"ratio": None, "never": 0, "undefined": undefined}
    return {"ratio": mean_ci(ratios) if ratios else None, "never": never, "undefined": undefined}


def _curve(runs: list[ArmResult]) -> list[tuple[int, float, float]]:
    """Seed-mean (iteration, training seconds, eval reward) at each evaluation."""
    points = []
    for k in range(min(len(r.evals) for r in runs)):
        points.append((
            runs[0].evals[k][0],
            statistics.fmean(r.evals[k][1] for r in runs),
            statistics.fmean(r.evals[k][2]["reward_mean"] for r in runs),
        ))
    return points


def summarise(results: list[ArmResult]) -> list[dict[str, Any]]:
    """One row per label (preset or variant), in first-seen order."""
    labels = list(dict.fromkeys(r.label for r in results))
    by_label = {label: [r for r in results if r.label == label] for label in labels}
    iter_time = {label: statistics.median(t for r in runs for t in r.iter_times) for label, runs in by_label.items()}
    target = None
    if REFERENCE in by_label:
        ref = by_label[REFERENCE]
        target = statistics.fmean(r.evals[-1][2]["reward_mean"] for r in ref)
        if target <= statistics.fmean(r.evals[0][2]["reward_mean"] for r in ref):
            target = None  # DanceGRPO did not improve: "time to its reward" would be 0 for everyone
    rows = []
    for label, runs in by_label.items():
        curve = _curve(runs)
        finals = [r.evals[-1][2] for r in runs]
        reward_names = [k for k in finals[0] if k.startswith("reward_") and k != "reward_mean"]
        reached = [sec for _, sec, reward in curve if target is not None and reward >= target]
        rows.append({
            "preset": label,
            "eval_split": finals[0].get("split", "heldout"),
            "seeds": [r.seed for r in runs],
            "iterations": len(runs[0].iter_times),
            "model_passes_per_image": statistics.fmean(p for r in runs for p in r.model_passes),
            "iter_time_s": iter_time[label],
            "time_ratio_vs_dance_grpo": iter_time[label] / iter_time[REFERENCE] if REFERENCE in iter_time else None,
            "paper_time_ratio": (PAPER_ITER_TIME_S[label] / PAPER_ITER_TIME_S[REFERENCE]
                                 if label in PAPER_ITER_TIME_S else None),
            "initial_eval_reward": statistics.fmean(r.evals[0][2]["reward_mean"] for r in runs),
            "final_eval_reward": mean_ci([f["reward_mean"] for f in finals]),
            "reward_gain": mean_ci([r.evals[-1][2]["reward_mean"] - r.evals[0][2]["reward_mean"] for r in runs]),
            "final_eval_rewards": {k.removeprefix("reward_"): mean_ci([f[k] for f in finals]) for k in reward_names},
            "paired_vs_dance_grpo": (paired_difference(runs, by_label[REFERENCE])
                                     if REFERENCE in by_label and label != REFERENCE else None),
            "target_reward": target,
            "time_to_target_s": reached[0] if reached else None,
            "time_to_dance_reward": (time_to_reference(runs, by_label[REFERENCE]) if REFERENCE in by_label else None),
            "final_flatness": (mean_ci([f["reward_flatness"] for f in finals])
                               if all("reward_flatness" in f for f in finals) else None),
            "train_time_s": statistics.fmean(r.train_seconds for r in runs),
            "peak_memory_gb": (max(r.peak_memory_bytes for r in runs) / 2**30
                               if all(r.peak_memory_bytes is not None for r in runs) else None),
            "curve": [{"iteration": i, "train_s": s, "eval_reward": v} for i, s, v in curve],
        })
    return rows


def _fmt(stat: dict[str, float | None], digits: int = 3) -> str:
    ci = stat["ci95"]
    return f"{stat['mean']:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def _time_fraction(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    parts = [_fmt(stat["ratio"])] if stat["ratio"] is not None else []
    parts += [f"never on {stat['never']} seed(s)"] if stat["never"] else []
    parts += [f"undefined on {stat['undefined']} seed(s)"] if stat["undefined"] else []
    return "; ".join(parts) or "—"


def _split_name(rows: list[dict[str, Any]]) -> str:
    """What the evaluations scored: ``held-out`` or ``training-prompt`` (``eval_split``)."""
    return EVAL_SPLITS[rows[0]["eval_split"] if rows else "heldout"]


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    split = _split_name(rows)
    lines = [
        f"## {title}", "",
        f"| preset | passes/image | iter time (s) | time ratio vs DanceGRPO | paper ratio (FLUX) | {split} reward | gain | "
        "paired Δ vs DanceGRPO (± seeds; ± prompts) | time to DanceGRPO's reward (s) | "
        "that time / DanceGRPO's (paired) | flatness |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "—" if r["time_ratio_vs_dance_grpo"] is None else f"{r['time_ratio_vs_dance_grpo']:.3f}"
        paper = "—" if r["paper_time_ratio"] is None else f"{r['paper_time_ratio']:.3f}"
        ttt = "—" if r["target_reward"] is None else (
            "never" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f}")
        paired = r.get("paired_vs_dance_grpo")
        delta = "—" if paired is None else (
            f"{_fmt(paired['seeds'])}" + ("" if paired["prompts_ci95"] is None else f"; ± {paired['prompts_ci95']:.3f}"))
        lines.append(
            f"| {r['preset']} | {r['model_passes_per_image']:.1f} | {r['iter_time_s']:.2f} | {ratio} | {paper} | "
            f"{_fmt(r['final_eval_reward'])} | {_fmt(r['reward_gain'])} | {delta} | {ttt} | "
            f"{_time_fraction(r.get('time_to_dance_reward'))} | "
            f"{'—' if r.get('final_flatness') is None else _fmt(r['final_flatness'])} |"
        )
    seeds = rows[0]["seeds"]
    lines += ["", f"{len(seeds)} seed(s) {seeds}, {rows[0]['iterations']} iterations each, interleaved in one process; "
              f"± is a 95% t-interval over seeds; the paired Δ is the final {split} composition minus DanceGRPO's for the same "
              "seed, prompts and evaluation noise (± over seeds, then ± over prompts). Paper (v7 Table 1): DanceGRPO 291.3 s, MixGRPO 149.3 s, MixGRPO-Flash "
              "112.4 s, MixGRPO-Flash* 83.3 s per iteration (FLUX, 32 GPUs)."]
    if any(r["peak_memory_gb"] is not None for r in rows):
        lines.append("Peak GPU memory per iteration (GiB): " + ", ".join(
            f"{r['preset']} {r['peak_memory_gb']:.1f}" for r in rows if r["peak_memory_gb"] is not None) + ".")
    if rows[0]["target_reward"] is None and any(r["preset"] == REFERENCE for r in rows):
        lines.append(f"Time to DanceGRPO's reward: — because DanceGRPO's final {split} reward did not exceed its start.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: list[ArmResult], *, title: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Write ``bench.json``, ``bench.md``, ``reward_vs_time.png`` and ``reward_vs_iteration.png``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    axis = f"{_split_name(rows)} reward"
    (out / "bench.json").write_text(json.dumps({"title": title, "config": config, "rows": rows}, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(rows, title))
    save_curve(out / "reward_vs_time.png", None,
               {r["preset"]: ([p["train_s"] for p in r["curve"]], [p["eval_reward"] for p in r["curve"]]) for r in rows},
               "training seconds (seed mean)", axis)
    save_curve(out / "reward_vs_iteration.png", None,
               {r["preset"]: ([p["iteration"] for p in r["curve"]], [p["eval_reward"] for p in r["curve"]]) for r in rows},
               "iteration", axis)
    return rows

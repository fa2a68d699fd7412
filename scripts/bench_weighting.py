"""Reward weightings side by side on the embedded world: composition (the verifier) against
flatness (clean images), MixGRPO at the demo's budget.

    python scripts/bench_weighting.py run --arm static --seed 0 --out runs/weighting   # each arm x seed
    python scripts/bench_weighting.py base --out runs/weighting     # the shipped base, same protocol
    python scripts/bench_weighting.py cost --out runs/weighting     # seconds per iteration, arms interleaved
    python scripts/bench_weighting.py report --out runs/weighting   # table, Pareto plot, JSON

Arms share seeds, prompts and noise; every arm starts from the shipped base with static weights
composition 1, flatness 0.25 (`rewards`), and differs only in `weighting.name`:

* ``static``: those weights throughout (and, evaluated with ``--blend 0.2``, MixGRPO's 80/20 blend);
* ``progress``, ``gradient``: the dynamic schemes from the same starting weights;
* ``constraint``: maximise composition with flatness >= 0.95 x its first batch mean.

Training's own evaluations use 16 prompts (they do not change the training run); each finished
run is evaluated on the 256 held-out prompts (one deterministic 25-step sample per
prompt, the same noise for every arm): per-prompt composition and flatness, paired against
``static`` of the same seed. ``report`` writes ``weighting.md``, ``weighting.json`` and
``pareto.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REWARDS = {  # reward sets: name -> weight (the static weights every arm starts from)
    "two": {"composition": 1.0, "flatness": 0.25},
    "three": {"composition": 1.0, "flatness": 0.25, "centring": 0.25},
}
# one optimizer step per rollout in every arm: the gradient arm combines one gradient per reward
# per iteration, and the arms must differ in the weighting only (the bench predates the
# preset's 4 steps per rollout; its figures were measured with 1)
SHARED = ["model.dtype=bfloat16", "eval_every=60", "eval_prompts=16", "optim.minibatches=1"]


def arms(rewards: str) -> dict[str, list[str]]:
    """The weighting arms for a reward set; constraint floors every reward but composition at 0.95."""
    floors = ", ".join(f"{n}: 0.95" for n in REWARDS[rewards] if n != "composition")
    spec = "rewards={" + ", ".join(f"{n}: {w}" for n, w in REWARDS[rewards].items()) + "}"
    return {
        "static": [spec],
        "progress": [spec, "weighting.name=progress"],
        "gradient": [spec, "weighting.name=gradient"],
        "constraint": [spec, "weighting.name=constraint", "weighting.primary=composition",
                       f"weighting.floors={{{floors}}}"],
    }


ARMS = arms("two")


def run(arm: str, seed: int, out: Path, rewards: str = "two") -> None:
    from mixgrpo.inference.evaluate import evaluate_policy
    from mixgrpo.inference.policy import load_policy
    from mixgrpo.train.config import apply_overrides
    from mixgrpo.train.presets import make_preset
    from mixgrpo.train.run import train
    from mixgrpo.world.grammar import heldout_eval_prompts

    folder = out / f"{arm}_s{seed}"
    cfg = apply_overrides(make_preset("mixgrpo"), [*SHARED, f"seed={seed}", *arms(rewards)[arm]])
    train(cfg, folder, resume=(folder / "checkpoints").is_dir())
    policy = load_policy(folder)
    prompts = heldout_eval_prompts(256)
    for blend in (0.0, 0.2) if arm == "static" else (0.0,):
        result = evaluate_policy(policy, prompts, list(REWARDS[rewards]), blend=blend)
        (folder / f"heldout_blend{blend:g}.json").write_text(json.dumps(result) + "\n")


def cost(out: Path, rewards: str = "two", iterations: int = 6) -> None:
    """Seconds per iteration of every arm, measured in one process with the arms interleaved
    iteration by iteration (so machine load hits them alike); writes ``cost.json``."""
    import time

    import torch

    from mixgrpo.train.config import apply_overrides
    from mixgrpo.train.presets import make_preset
    from mixgrpo.train.trainer import GRPOTrainer

    torch.set_num_threads(1)
    trainers = {arm: GRPOTrainer(apply_overrides(make_preset("mixgrpo"), [*SHARED, *extra]))
                for arm, extra in arms(rewards).items()}
    seconds: dict[str, list[float]] = {arm: [] for arm in trainers}
    for it in range(iterations):
        for arm, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(it)
            seconds[arm].append(time.perf_counter() - start)
    mean = {arm: statistics.fmean(v[1:]) for arm, v in seconds.items()}  # the first iteration warms up
    result = {"iterations": iterations, "seconds": seconds, "mean_s": mean,
              "ratio_vs_static": {arm: m / mean["static"] for arm, m in mean.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratio_vs_static"], indent=1))


def base(out: Path) -> None:
    from mixgrpo.inference.evaluate import evaluate_policy
    from mixgrpo.inference.policy import load_policy
    from mixgrpo.world.grammar import heldout_eval_prompts

    result = evaluate_policy(load_policy("base"), heldout_eval_prompts(256), list(REWARDS["three"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_heldout.json").write_text(json.dumps(result) + "\n")


def _per_prompt(folder: Path, blend: float = 0.0) -> dict[str, list[float]]:
    rows = json.loads((folder / f"heldout_blend{blend:g}.json").read_text())["per_prompt"]
    return {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}


def _ci(values: list[float]) -> tuple[float, float | None]:
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def report(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({int(p.name.rsplit("_s", 1)[1]) for p in out.glob("static_s*") if (p / "heldout_blend0.json").is_file()})
    base_rewards = json.loads((out / "base_heldout.json").read_text())["rewards"]
    base_eval = {f"reward_{k}": v["mean"] for k, v in base_rewards.items()}
    rows, names = [], []
    variants = [(arm, 0.0) for arm in ARMS] + [("static", 0.2)]
    for arm, blend in variants:
        folders = [out / f"{arm}_s{s}" for s in seeds]
        if not all((f / f"heldout_blend{blend:g}.json").is_file() for f in folders):
            continue
        scores = [_per_prompt(f, blend) for f in folders]
        refs = [_per_prompt(out / f"static_s{s}") for s in seeds]
        names = list(scores[0])
        metrics = [[json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()] for f in folders]
        row = {"arm": arm if blend == 0 else f"static + blend {blend:g}", "seeds": seeds}
        for name in names:
            row[name] = _ci([statistics.fmean(s[name]) for s in scores])
            row[f"{name}_vs_static"] = _ci([statistics.fmean(a - b for a, b in zip(s[name], r[name], strict=True))
                                            for s, r in zip(scores, refs, strict=True)])
            weights = [ms[-1].get(f"weight_{name}") for ms in metrics]
            row[f"final_weight_{name}"] = statistics.fmean(weights) if None not in weights else None
        rows.append(row)
    ratio = json.loads((out / "cost.json").read_text())["ratio_vs_static"] if (out / "cost.json").is_file() else {}
    fmt = lambda m: f"{m[0]:.3f}" + (f" ± {m[1]:.3f}" if m[1] is not None else "")  # noqa: E731
    others = [n for n in names if n != "composition"]
    lines = ["Base: " + ", ".join(f"{n} {base_eval[f'reward_{n}']:.3f}" for n in names)
             + f"; {len(seeds)} seed(s), 256 held-out prompts, ± = 95% t over seeds; Δ: paired by seed and prompt.", "",
             "| arm | " + " | ".join(f"{n} | Δ vs static" for n in names) + " | "
             + " | ".join(f"{n} / base" for n in others) + " | final weights | iteration time / static (`cost`) |",
             "|---|" + "---|---|" * len(names) + "---|" * len(others) + "---|---|"]
    for r in rows:
        weights = ", ".join(f"{n[:4]} {r[f'final_weight_{n}']:.2f}" for n in names if r[f"final_weight_{n}"] is not None)
        cost_cell = f"{ratio[r['arm']]:.2f}" if r["arm"] in ratio else "as static" if "blend" in r["arm"] else "not measured"
        lines.append(f"| {r['arm']} | " + " | ".join(f"{fmt(r[n])} | {fmt(r[f'{n}_vs_static'])}" for n in names) + " | "
                     + " | ".join(f"{r[n][0] / base_eval[f'reward_{n}']:.3f}" for n in others)
                     + f" | {weights} | {cost_cell} |")
    (out / "weighting.md").write_text("\n".join(lines) + "\n")
    (out / "weighting.json").write_text(json.dumps({"base": base_eval, "rows": rows}, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    ax.scatter([base_eval["reward_composition"]], [base_eval["reward_flatness"]], marker="*", s=120, c="k", label="base")
    for r in rows:
        ax.errorbar(r["composition"][0], r["flatness"][0], xerr=r["composition"][1] or 0, yerr=r["flatness"][1] or 0,
                    fmt="o", capsize=3, label=r["arm"])
    ax.set_xlabel("held-out composition")
    ax.set_ylabel("held-out flatness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "base", "cost", "report"])
    parser.add_argument("--arm", choices=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/weighting"))
    parser.add_argument("--rewards", choices=list(REWARDS), default="two", help="reward set of the arms")
    args = parser.parse_args()
    if args.command == "run":
        if args.arm is None:
            parser.error("run needs --arm")
        run(args.arm, args.seed, args.out, args.rewards)
    elif args.command == "base":
        base(args.out)
    elif args.command == "cost":
        cost(args.out, args.rewards)
    else:
        report(args.out)


if __name__ == "__main__":
    main()

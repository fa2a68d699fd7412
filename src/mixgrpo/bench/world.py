"""Embedded-world benchmark: reward throughput, sampling speed and an embedded model's quality.

    python -m mixgrpo.bench.world [--checkpoint DIR] [--guidance 1.0] [--grid FILE] [--json FILE] [--rewards-only]

Prints (and with ``--json FILE`` writes) the images/s of each embedded reward on 2,048 renders
(median of 3 timed runs after a warm-up) and, for the checkpoint (default: the shipped base),
one deterministic 25-step Euler sample per prompt scored by ``composition`` on:

- ``single``: "one <colour> <shape>" for each training colour-shape pair, 8 seeds each;
- ``heldout``: all 396 held-out prompts (mean with a 95% CI, exact rate, per prompt form);
- ``train_relations``: 128 training relation prompts.

"exact" is a score of 1: exactly the prompt's objects, each matching a renderer template,
the relation right, at most a few stray pixels. ``--grid`` writes samples beside renders of
the same prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..rewards import get_reward
from ..world import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    format_prompt,
    parse_prompt,
    render,
    sample_pairs,
    split_prompts,
)
from ..world.grammar import CountSpec

__all__ = ["evaluate_checkpoint", "main", "quality_report", "reward_throughput"]


def reward_throughput(n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Images/s of each embedded reward on ``n`` ground-truth renders at 32 px (median of ``repeats``)."""
    prompts, images = sample_pairs(n, seed=123)
    out = {}
    for name in ("composition", "flatness"):
        reward = get_reward(name)
        reward(images, prompts)  # warm-up: parse cache, allocator, thread pool
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            reward(images, prompts)
            times.append(time.perf_counter() - start)
        out[name] = n / float(np.median(times))
    return out


def _model(checkpoint):
    from ..inference.policy import load_policy

    return load_policy(checkpoint or "base")


@torch.no_grad()
def evaluate_checkpoint(model, prompts: list[str], *, steps: int = 25, guidance: float = 1.0, seed: int = 0) -> dict:
    """One 25-step Euler ODE sample per prompt, scored by ``composition``; ``model`` is a loaded policy."""
    from ..inference.generate import generate_prompts
    from ..text import cached_embeddings

    train, heldout = split_prompts()
    start = time.perf_counter()
    images = generate_prompts(model, cached_embeddings(train + heldout), prompts, steps=steps, guidance=guidance,
                              seed=seed)
    seconds = time.perf_counter() - start
    score = get_reward("composition")(images, prompts)
    is_count = torch.tensor([not p.startswith("a ") for p in prompts])
    return {
        "n": len(prompts),
        "composition_mean": score.mean().item(),
        "composition_ci95": 1.96 * score.std().item() / len(prompts) ** 0.5,
        "exact_fraction": (score == 1).float().mean().item(),
        "count_prompts_mean": score[is_count].mean().item() if is_count.any() else None,
        "relation_prompts_mean": score[~is_count].mean().item() if (~is_count).any() else None,
        "count_exact": (score[is_count] == 1).float().mean().item() if is_count.any() else None,
        "relation_exact": (score[~is_count] == 1).float().mean().item() if (~is_count).any() else None,
        "sampling_images_per_s": len(prompts) / seconds,
        "images": images,
        "scores": score,
        "prompts": list(prompts),
    }


def _single_object_prompts(repeats: int = 8) -> list[str]:
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
    return [format_prompt(CountSpec(1, c, s)) for c, s in pairs] * repeats


def quality_report(checkpoint: str | None = None, *, guidance: float = 1.0) -> dict:
    """The figures the module docstring lists, for ``checkpoint`` (default: the shipped base)."""
    model = _model(checkpoint)
    train, heldout = split_prompts()
    relations = [p for p in train if p.startswith("a ")]
    relations = [relations[i] for i in sorted(np.random.default_rng(0).permutation(len(relations))[:128])]
    report = {"checkpoint": str(checkpoint or "base"), "guidance": guidance}
    for name, prompts in (("single", _single_object_prompts()), ("heldout", heldout), ("train_relations", relations)):
        report[name] = evaluate_checkpoint(model, prompts, guidance=guidance)
    return report


def save_comparison_grid(path: Path, images: torch.Tensor, prompts: list[str], scores: torch.Tensor, seed: int = 0) -> None:
    """Pairs of columns: a render of the prompt, then the model's sample (titled with its score)."""
    from ..viz import save_image_grid

    rng = np.random.default_rng(seed)
    renders = torch.from_numpy(np.stack([render(parse_prompt(p), rng) for p in prompts])).permute(0, 3, 1, 2).float() / 255
    tiles = torch.stack([renders, images], dim=1).flatten(0, 1)
    titles = [t for p, s in zip(prompts, scores.tolist(), strict=True) for t in (f"render: {p}", f"model {s:.2f}")]
    save_image_grid(path, tiles, titles, columns=8)


def _summary(name: str, ev: dict) -> str:
    parts = [f"{name:<16} n={ev['n']:<4} composition {ev['composition_mean']:.3f} +- {ev['composition_ci95']:.3f}",
             f"exact {ev['exact_fraction']:.3f}"]
    if ev["count_exact"] is not None and ev["relation_exact"] is not None:
        parts.append(f"(count prompts exact {ev['count_exact']:.3f}, relation prompts exact {ev['relation_exact']:.3f})")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards-only", action="store_true", help="only time the rewards")
    parser.add_argument("--checkpoint", default=None, help="checkpoint (base, a model, adapter or run folder)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--grid", type=Path, default=None, help="write renders beside samples (PNG) here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    results: dict = {"reward_images_per_s": reward_throughput(), "torch_threads": torch.get_num_threads()}
    for name, rate in results["reward_images_per_s"].items():
        print(f"reward {name:<12} {rate:>10.0f} images/s (2048 renders at 32 px, {torch.get_num_threads()} threads)")
    if not args.rewards_only:
        report = quality_report(args.checkpoint, guidance=args.guidance)
        for name in ("single", "heldout", "train_relations"):
            print(_summary(name, report[name]))
        print(f"sampling (25 Euler steps): {report['heldout']['sampling_images_per_s']:.1f} images/s")
        if args.grid is not None:
            picks = list(range(8))  # the first 8 training colour-shape pairs, one object each
            single, held = report["single"], report["heldout"]
            held_picks = np.random.default_rng(1).permutation(held["n"])[:24].tolist()
            images = torch.cat([single["images"][picks], held["images"][held_picks]])
            scores = torch.cat([single["scores"][picks], held["scores"][held_picks]])
            prompts = [single["prompts"][i] for i in picks] + [held["prompts"][i] for i in held_picks]
            save_comparison_grid(args.grid, images, prompts, scores)
            print(f"wrote {args.grid}")
        for name in ("single", "heldout", "train_relations"):
            report[name] = {k: v for k, v in report[name].items() if k not in ("images", "scores", "prompts")}
        results.update(report)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()

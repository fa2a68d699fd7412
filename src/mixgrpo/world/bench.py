"""Embedded-default benchmark: reward throughput, sampling speed and base-model quality.

    python -m mixgrpo.world.bench [--rewards-only] [--checkpoint DIR] [--prompts 256] [--guidance 1.0]

Prints (and with ``--json FILE`` writes) images/s of each embedded reward on 2,048 renders
(median of 3 timed runs after a warm-up), images/s of 25-step ODE sampling with the
checkpoint, and the checkpoint's mean ``composition`` on held-out prompts (per prompt form
too), with a sample grid when ``--grid FILE`` is given. Without ``--checkpoint`` and with no
shipped base checkpoint yet, the model part is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..rewards import get_reward
from .grammar import split_prompts
from .render import sample_pairs

__all__ = ["evaluate_checkpoint", "heldout_eval_prompts", "main", "reward_throughput"]


def heldout_eval_prompts(n: int = 256, seed: int = 0) -> list[str]:
    """A fixed sample of ``n`` held-out prompts (seeded permutation of the held-out split)."""
    heldout = split_prompts()[1]
    if not 1 <= n <= len(heldout):
        raise ValueError(f"n must be in [1, {len(heldout)}] held-out prompts, got {n}")
    order = np.random.default_rng(seed).permutation(len(heldout))[:n]
    return [heldout[i] for i in sorted(order)]


def reward_throughput(n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """Images/s of each embedded reward on ``n`` ground-truth renders at 32 px.

    Args:
        n: batch size scored in one call.
        repeats: timed calls after one warm-up call; the median counts.

    Returns:
        ``{reward name: images per second}``.
    """
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


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: str | None, prompts: list[str], *, steps: int = 25, guidance: float = 1.0, seed: int = 0,
) -> dict:
    """Sample one image per prompt with a 25-step Euler ODE and score it."""
    # Model imports stay local so the reward benchmark runs without them.
    from ..inference.generate import generate_prompts
    from ..models.checkpoint import load_embedded
    from ..text import cached_embeddings

    model = load_embedded(checkpoint)
    embeddings = cached_embeddings(prompts)
    reward = get_reward("composition")
    start = time.perf_counter()
    images = generate_prompts(model, embeddings, prompts, steps=steps, guidance=guidance, seed=seed)
    seconds = time.perf_counter() - start
    score = reward(images, prompts)
    is_count = torch.tensor([not p.startswith("a ") for p in prompts])
    return {
        "checkpoint": str(checkpoint or "base"),
        "n": len(prompts),
        "composition_mean": score.mean().item(),
        "composition_ci95": 1.96 * score.std().item() / len(prompts) ** 0.5,
        "count_prompts_mean": score[is_count].mean().item() if is_count.any() else None,
        "relation_prompts_mean": score[~is_count].mean().item() if (~is_count).any() else None,
        "exact_fraction": (score == 1).float().mean().item(),
        "sampling_images_per_s": len(prompts) / seconds,
        "steps": steps,
        "guidance": guidance,
        "images": images,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards-only", action="store_true", help="only time the rewards")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped base)")
    parser.add_argument("--prompts", type=int, default=256, help="held-out prompts to evaluate")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--grid", type=Path, default=None, help="write a sample grid PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    results: dict = {"reward_images_per_s": reward_throughput(), "torch_threads": torch.get_num_threads()}
    for name, rate in results["reward_images_per_s"].items():
        print(f"reward {name:<12} {rate:>10.0f} images/s (2048 renders at 32 px, {torch.get_num_threads()} threads)")
    if args.rewards_only:
        return _finish(results, args.json)
    try:
        ev = evaluate_checkpoint(args.checkpoint, heldout_eval_prompts(args.prompts), guidance=args.guidance)
    except FileNotFoundError as err:
        if args.checkpoint is not None:
            raise
        print(f"skipping the held-out evaluation: {err}")
        return _finish(results, args.json)
    images = ev.pop("images")
    results["heldout"] = ev
    print(f"sampling (25 Euler steps, guidance {args.guidance}): {ev['sampling_images_per_s']:.1f} images/s")
    by_form = ", ".join(
        f"{form} prompts {ev[key]:.3f}" for form, key in (("count", "count_prompts_mean"), ("relation", "relation_prompts_mean"))
        if ev[key] is not None
    )
    print(f"held-out composition over {ev['n']} prompts: {ev['composition_mean']:.3f} +- {ev['composition_ci95']:.3f} "
          f"({by_form}; exact {ev['exact_fraction']:.3f})")
    if args.grid is not None:
        from ..viz import save_image_grid

        prompts = heldout_eval_prompts(args.prompts)
        save_image_grid(args.grid, images[:32], prompts[:32], columns=8)
        print(f"wrote {args.grid}")
    return _finish(results, args.json)


def _finish(results: dict, path: Path | None) -> dict:
    if path is not None:
        path.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()

"""A before/after grid: the same held-out prompts and noise, sampled by the base and by a run.

    python scripts/before_after_grid.py --run runs/demo --out docs/demo_before_after.png [--n 16] [--blend 0]

Columns come in pairs (base, trained), each tile titled with its ``composition`` score; the
prompts are the first ``n`` of the run's held-out evaluation prompts that the trained model
and the base score differently, half where it gained and half where it lost (so the grid
shows failures too, not only wins). Prints the mean scores of the shown tiles.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mixgrpo.inference.generate import generate_prompts
from mixgrpo.inference.policy import load_policy
from mixgrpo.rewards import get_reward
from mixgrpo.text import cached_embeddings
from mixgrpo.viz import save_image_grid
from mixgrpo.world import heldout_eval_prompts, split_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--blend", type=float, default=0.0)
    parser.add_argument("--prompts", type=int, default=256)
    args = parser.parse_args()
    prompts = heldout_eval_prompts(args.prompts)
    train, heldout = split_prompts()
    embeddings = cached_embeddings(train + heldout)
    trained = load_policy(args.run)
    before = generate_prompts(trained.base, embeddings, prompts, seed=0)
    after = generate_prompts(trained, embeddings, prompts, seed=0, blend=args.blend, base=trained.base)
    reward = get_reward("composition")
    s0, s1 = reward(before, prompts), reward(after, prompts)
    gained = [i for i in range(len(prompts)) if s1[i] > s0[i]]
    lost = [i for i in range(len(prompts)) if s1[i] < s0[i]]
    picks = sorted(gained[: args.n - min(len(lost), args.n // 4)] + lost[: min(len(lost), args.n // 4)])
    tiles = torch.stack([before[picks], after[picks]], dim=1).flatten(0, 1)
    titles = [t for i in picks for t in (f"base {s0[i]:.2f}: {prompts[i]}", f"trained {s1[i]:.2f}")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(args.out, tiles, titles, columns=8)
    print(f"all {len(prompts)} prompts: base {s0.mean():.3f} -> trained {s1.mean():.3f}; "
          f"{len(gained)} gained, {len(lost)} lost, {len(prompts) - len(gained) - len(lost)} unchanged")
    print(f"wrote {args.out} ({len(picks)} prompts: {len(picks) - min(len(lost), args.n // 4)} gains, "
          f"{min(len(lost), args.n // 4)} losses)")


if __name__ == "__main__":
    main()

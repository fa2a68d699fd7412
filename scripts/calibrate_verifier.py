"""Score every perturbation family with the first and the current ``composition`` verifier.

    python scripts/calibrate_verifier.py [--n 300] [--seed 1] [--out table.md]

Prints a Markdown table: family, the bound ``tests/test_verifier_calibration.py`` holds the
current verifier to, mean score under verifier v1 and v2, and the share of images v2 scores
above 0.5. The last row is the regression set of reward-hacked images (the first round's
demo policy, ``tests/data/hacked_v1.npz``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mixgrpo.rewards import get_reward
from mixgrpo.world import all_prompts, parse_prompt
from mixgrpo.world.adversarial import perturbed

HACKED = Path(__file__).resolve().parent.parent / "tests" / "data" / "hacked_v1.npz"
# family -> (kind of bound, bound): the calibration test's figures, kept here for the table
BOUNDS = {
    "clean render": (">=", 0.98),
    "one attribute changed": ("<=", 0.4),
    "one extra object": ("<=", 0.4),
    "objects -> same-area blobs": ("<=", 0.2),
    "speckle (20 px)": ("<=", 0.7),
    "smear (3 px)": ("<=", 0.2),
    "blur (sigma 1 px)": ("<=", 0.6),
    "half-drawn": ("<=", 0.05),
    "shapes x1.5": ("<=", 0.05),
    "shapes x0.6": ("<=", 0.05),
    "colour mass": ("<=", 0.05),
    "hacked (first demo policy)": ("<=", 0.15),
}


def family_batch(family: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` prompts drawn from the whole grammar and their ``family`` images, ``(n, 3, 32, 32)`` in [0, 1]."""
    pool = all_prompts()
    prompts = [pool[i] for i in np.random.default_rng(seed).choice(len(pool), n, replace=False)]
    images = perturbed(family, [parse_prompt(p) for p in prompts], seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, prompts


def hacked_batch() -> tuple[torch.Tensor, list[str]]:
    data = np.load(HACKED)
    return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255, [str(p) for p in data["prompts"]]


def table(n: int, seed: int) -> str:
    v1, v2 = get_reward("composition-v1"), get_reward("composition")
    rows = ["| family | bound (v2) | verifier v1 | verifier v2 | v2 > 0.5 |", "|---|---|---|---|---|"]
    for family, (op, bound) in BOUNDS.items():
        images, prompts = hacked_batch() if family.startswith("hacked") else family_batch(family, n, seed)
        a, b = v1(images, prompts), v2(images, prompts)
        rows.append(f"| {family} | {op} {bound} | {a.mean():.3f} | {b.mean():.3f} | {(b > 0.5).float().mean():.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table(args.n, args.seed)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

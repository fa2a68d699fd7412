"""Write the regression set of reward-hacked images: a policy's held-out samples, uint8.

    python scripts/make_hacked_set.py --run runs/demo --out tests/data/hacked_v1.npz

Kept as test data so the verifier can never again score the first round's blob soup as
correct (`tests/test_verifier_calibration.py`). The committed file holds 256 held-out
samples of the policy that the first round's `make demo` trained (MixGRPO, 80 iterations,
against verifier v1, seed 0), one deterministic 25-step Euler sample each (seed 0).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mixgrpo.inference.generate import generate_prompts
from mixgrpo.inference.policy import load_policy
from mixgrpo.text import cached_embeddings
from mixgrpo.world.grammar import heldout_eval_prompts, split_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("-n", type=int, default=256)
    args = parser.parse_args()
    prompts = heldout_eval_prompts(args.n)
    train, heldout = split_prompts()
    policy = load_policy(args.run)
    images = generate_prompts(policy, cached_embeddings(train + heldout), prompts, seed=0)
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    np.savez_compressed(args.out, images=pixels, prompts=np.array(prompts))
    print(f"wrote {args.out}: {pixels.shape}")


if __name__ == "__main__":
    main()

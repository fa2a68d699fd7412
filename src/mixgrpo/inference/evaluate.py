"""Reward tables over prompt files: per checkpoint (and blend), mean, std and 95% CI of each
reward, plus per-prompt scores.

Statistics treat the prompt as the unit: each prompt's score is its mean over ``seeds``
samples, and ``ci95 = 1.96 * std(per-prompt scores, ddof=1) / sqrt(n)`` over the ``n`` prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..rewards import get_reward, score
from ..text import cached_embeddings
from .generate import generate_prompts
from .policy import Policy

__all__ = ["evaluate_policy", "markdown_table", "summarise_scores"]


def summarise_scores(per_prompt: torch.Tensor) -> dict[str, float]:
    """``mean``, ``std`` and ``ci95`` of per-prompt scores ``(n,)``."""
    n = per_prompt.numel()
    std = per_prompt.std(correction=1).item() if n > 1 else 0.0
    return {"mean": per_prompt.mean().item(), "std": std, "ci95": 1.96 * std / math.sqrt(n)}


def evaluate_policy(
    policy: Policy,
    prompts: Sequence[str],
    rewards: Sequence[str],
    *,
    blend: float = 0.0,
    seeds: int = 1,
    steps: int = 25,
    shift: float = 3.0,
    solver: str = "euler",
    guidance: float = 1.0,
    on_images: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Sample every prompt ``seeds`` times (seed ``k`` for pass ``k``) and score each reward.

    A reward with a ``check_prompts(prompts)`` method (raising ``ValueError`` for prompts it
    cannot score) is asked first, so a bad prompt fails before any image is drawn."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    scorers = {name: get_reward(name) for name in rewards}
    for reward in scorers.values():  # a reward that can refuse prompts does so before any sampling
        check = getattr(reward, "check_prompts", None)
        if callable(check):
            check(list(prompts))
    embeddings = cached_embeddings(list(dict.fromkeys(prompts)))
    totals = {name: torch.zeros(len(prompts)) for name in rewards}
    for k in range(seeds):
        images = generate_prompts(policy, embeddings, prompts, seed=k * 1_000_003, steps=steps, shift=shift,
                                  solver=solver, guidance=guidance, blend=blend, base=policy.base, on_chunk=on_images)
        for name, reward in scorers.items():
            totals[name] += score(reward, images, list(prompts))
    per_prompt = {name: t / seeds for name, t in totals.items()}
    return {
        "checkpoint": policy.name,
        "weights": policy.source,
        "blend": blend,
        "n": len(prompts),
        "seeds": seeds,
        "rewards": {name: summarise_scores(s) for name, s in per_prompt.items()},
        "per_prompt": [
            {"prompt": p, **{name: round(per_prompt[name][i].item(), 6) for name in rewards}} for i, p in enumerate(prompts)
        ],
    }


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per evaluated (checkpoint, blend): ``mean ± ci95`` of each reward."""
    names = list(results[0]["rewards"])
    lines = ["| checkpoint | blend | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in results:
        cells = [f"{r['rewards'][n]['mean']:.3f} ± {r['rewards'][n]['ci95']:.3f}" for n in names]
        lines.append(f"| {r['checkpoint']} | {r['blend']:g} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

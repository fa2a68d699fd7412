"""The embedded procedural worlds by name: what a model of each is trained and evaluated on.

* ``image``: the text-to-image grammar (counts and relations, :mod:`.grammar`), verified by
  ``composition`` (``flatness`` reported beside it, so hacking one shows in the other);
* ``motion``: the moving-shapes clips (:mod:`.motion`), verified by ``motion-composition``.

An embedded model says which world it generates in its config (``world``; image models have
none and mean ``image``), so the trainer, ``sample`` and ``eval`` take prompts and verifiers
from the model, never from a name branch. Rewards are named, not imported: the world layer
sits below the rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .grammar import all_prompts, heldout_eval_prompts, split_prompts
from .motion import motion_prompts, split_motion_prompts

__all__ = ["WORLDS", "World", "get_world", "world_of"]


@dataclass(frozen=True)
class World:
    """One procedural world: its prompts, its fixed train / held-out split and its verifiers."""

    name: str
    prompts: Callable[[], list[str]]  # every prompt, in a fixed order (what a base pretrains on)
    split: Callable[[], tuple[list[str], list[str]]]  # (train, heldout): RL trains on the first only
    heldout: Callable[[], list[str]]  # the held-out prompts `eval --prompts heldout` scores
    eval_prompts: Callable[[int], list[str]]  # n -> at most n held-out samples' prompts for training's evaluation
    eval_rewards: tuple[str, ...]  # rewards every held-out evaluation reports
    exact_rewards: tuple[str, ...]  # rewards whose score 1 means "fully correct" (their exact rate is reported)


def _repeated_heldout(n: int) -> list[str]:
    """The 12 held-out motion prompts, each ``max(1, n // 12)`` times, cycled (the first 12 are
    distinct): one prompt set is too few samples for a stable mean, and every repeat draws
    its own noise."""
    heldout = split_motion_prompts()[1]
    return heldout * max(1, n // len(heldout))


WORLDS: dict[str, World] = {
    "image": World("image", all_prompts, split_prompts, heldout_eval_prompts,
                   lambda n: heldout_eval_prompts(min(n, len(split_prompts()[1]))),
                   ("composition", "flatness"), ("composition",)),
    "motion": World("motion", motion_prompts, split_motion_prompts, lambda: split_motion_prompts()[1],
                    _repeated_heldout, ("motion-composition",), ("motion-composition",)),
}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}")
    return WORLDS[name]


def world_of(config: object) -> World:
    """The world a model's config says it generates (``world``; none: ``image``)."""
    return get_world(getattr(config, "world", "image"))

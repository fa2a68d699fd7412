"""Which steps of a ``T``-step grid are stochastic and trained at a given iteration.

Every schedule is a pure function of ``(iteration, seed)``: the same on every rank and on
resume (the public MixGRPO code draws its random windows unseeded on each rank, so ranks
disagree). Step ``T - 1`` ends at ``t = 0`` where the SDE has no density, so no schedule
ever returns it: the trainable steps are ``0 .. T - 2``.

MixGRPO's sliding window ``W(l) = {l, ..., l + w - 1}`` starts at the noisiest step and
moves by the stride ``s`` every ``interval`` iterations, ``l <- min(l + s, l_max)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["WINDOW_SCHEDULES", "WindowSchedule", "make_window_schedule", "window_starts"]

WINDOW_SCHEDULES: tuple[str, ...] = (
    "progressive",  # MixGRPO: slide from noisy to clean every `interval` iterations
    "decay",  # progressive, the interval shrinking as the window advances
    "exp_decay",  # progressive, the interval shrinking exponentially
    "random",  # MixGRPO's random: a fresh window start every iteration
    "fixed",  # a frozen window (MixGRPO-Flash*: steps 0-3)
    "random_range",  # Flow-GRPO-Fast: random window inside [low, high)
    "random_subset",  # DanceGRPO: a random fraction of all trainable steps
    "all",  # Flow-GRPO: every trainable step
)


def _rng(seed: int, iteration: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(iteration), 0x6D6978])


@dataclass(frozen=True)
class WindowSchedule:
    """A schedule of trained (stochastic) steps over a ``num_steps``-step grid.

    Attributes:
        name: one of :data:`WINDOW_SCHEDULES`.
        num_steps: ``T``.
        size: window size ``w`` (window schedules only).
        stride: ``s``, how far the window moves each time it moves.
        interval: iterations between moves (``progressive``); the starting interval for
            ``decay`` / ``exp_decay``.
        min_interval: the interval ``decay`` / ``exp_decay`` shrink to.
        decay_rate: ``exp_decay``'s per-move factor on the interval.
        start: the first window start (``fixed``: the frozen start).
        max_start: cap on the start; defaults to ``T - 1 - w`` so the window never reaches
            the final step. The public code caps at ``T - 2`` minus nothing more, because its
            last step is stochastic too.
        rollback: after reaching ``max_start``, jump back to ``start`` instead of staying.
        low, high: ``random_range`` bounds on the window (``low <= start``,
            ``start + w <= high``).
        fraction: ``random_subset``'s fraction of the ``T - 1`` trainable steps.
        seed: for the random schedules.
    """

    name: str
    num_steps: int
    size: int = 4
    stride: int = 1
    interval: int = 25
    min_interval: int = 1
    decay_rate: float = 0.75
    start: int = 0
    max_start: int | None = None
    rollback: bool = False
    low: int = 0
    high: int | None = None
    fraction: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WINDOW_SCHEDULES:
            raise ValueError(f"unknown window schedule {self.name!r}; choose one of {WINDOW_SCHEDULES}")
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"num_steps must be an integer >= 2 (one trainable step plus the last), got {self.num_steps!r}")
        trainable = self.num_steps - 1
        if self.name in ("random_subset", "all"):
            if self.name == "random_subset" and not 0 < self.fraction <= 1:
                raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
            return
        if not 1 <= self.size <= trainable:
            raise ValueError(
                f"window size {self.size} must be in [1, {trainable}] for a {self.num_steps}-step grid "
                f"(the last step cannot be stochastic)"
            )
        if self.stride < 1 or self.interval < 1 or self.min_interval < 1:
            raise ValueError(
                f"stride, interval and min_interval must be >= 1, got {self.stride}, {self.interval}, {self.min_interval}"
            )
        if self.min_interval > self.interval:
            raise ValueError(f"min_interval {self.min_interval} must be <= interval {self.interval}")
        if not 0 < self.decay_rate < 1:
            raise ValueError(f"decay_rate must be in (0, 1), got {self.decay_rate}")
        cap = self.largest_start
        if not 0 <= self.start <= cap:
            raise ValueError(f"window start {self.start} must be in [0, {cap}] for size {self.size}")
        if self.max_start is not None and not self.start <= self.max_start <= trainable - self.size:
            raise ValueError(
                f"max_start {self.max_start} must be in [{self.start}, {trainable - self.size}] "
                f"(window of {self.size} before the last step)"
            )
        if self.name == "random_range":
            high = self.num_steps - 1 if self.high is None else self.high
            if not self.low >= 0 and self.low + self.size <= high <= trainable:
                raise ValueError(
                    f"random_range needs 0 <= low, low + size <= high <= {trainable}; got low={self.low}, "
                    f"high={high}, size={self.size}"
                )

    @property
    def largest_start(self) -> int:
        return self.num_steps - 1 - self.size if self.max_start is None else self.max_start

    def start_at(self, iteration: int) -> int:
        """The window start ``l`` at ``iteration`` (window schedules only)."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        cap = self.largest_start
        if self.name == "fixed":
            return self.start
        if self.name == "random":
            return int(_rng(self.seed, iteration).integers(self.start, cap + 1))
        if self.name == "random_range":
            high = self.num_steps - 1 if self.high is None else self.high
            return int(_rng(self.seed, iteration).integers(self.low, high - self.size + 1))
        if self.name == "progressive":
            moves = iteration // self.interval
        else:
            moves = _moves_by(iteration, self._intervals())
        if self.rollback:
            return self._rolled(moves)
        return min(self.start + moves * self.stride, cap)

    def _rolled(self, moves: int) -> int:
        positions = list(range(self.start, self.largest_start + 1, self.stride))
        if positions[-1] != self.largest_start:
            positions.append(self.largest_start)
        return positions[moves % len(positions)]

    def _intervals(self):
        """Iterations spent at each successive window position."""
        interval = float(self.interval)
        move = 0
        while True:
            if self.name == "progressive":
                yield self.interval
            elif self.name == "decay":
                # linear shrink from `interval` to `min_interval` over the positions
                positions = max(1, math.ceil((self.largest_start - self.start) / self.stride))
                frac = min(move / positions, 1.0)
                yield max(self.min_interval, round(self.interval - frac * (self.interval - self.min_interval)))
            else:  # exp_decay
                yield max(self.min_interval, round(interval))
                interval *= self.decay_rate
            move += 1

    def steps(self, iteration: int) -> tuple[int, ...]:
        """Sorted indices of the trained steps at ``iteration``."""
        trainable = self.num_steps - 1
        if self.name == "all":
            return tuple(range(trainable))
        if self.name == "random_subset":
            count = max(1, int(self.fraction * trainable))
            chosen = _rng(self.seed, iteration).choice(trainable, size=count, replace=False)
            return tuple(sorted(int(k) for k in chosen))
        start = self.start_at(iteration)
        return tuple(range(start, start + self.size))


def _moves_by(iteration: int, intervals) -> int:
    """How many times the window has moved after ``iteration`` iterations."""
    moves, elapsed = 0, 0
    for length in intervals:
        elapsed += length
        if elapsed > iteration:
            return moves
        moves += 1
    raise AssertionError("unreachable: interval generator is infinite")


def make_window_schedule(name: str, num_steps: int, **kwargs) -> WindowSchedule:
    """Build a schedule by name; unknown names and bad sizes raise ``ValueError``."""
    return WindowSchedule(name=name, num_steps=num_steps, **kwargs)


def window_starts(schedule: WindowSchedule, iterations: Sequence[int]) -> list[int]:
    """Window start per iteration, for logging and plots."""
    return [schedule.steps(i)[0] for i in iterations]

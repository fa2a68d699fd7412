"""Which steps of a ``T``-step grid are stochastic and trained at a given iteration.

Every schedule is a pure function of ``(iteration, seed)``: the same on every rank and on
resume (the public MixGRPO code draws its random windows unseeded on each rank, so ranks
disagree). Step ``T - 1`` ends at ``t = 0`` where the SDE has no density, so no schedule
returns it unless ``final_step`` is set: the trainable steps are ``0 .. T - 2``. The
forward-process losses (DiffusionNFT, AWM) need no density and train at a step's start
time, so for them ``final_step=True`` makes ``0 .. T - 1`` trainable.

MixGRPO's sliding window ``W(l) = {l, ..., l + w - 1}`` starts at the noisiest step and
moves by the stride ``s`` every ``interval`` iterations, ``l <- min(l + s, l_max)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["WINDOW_SCHEDULES", "WindowSchedule", "make_window_schedule"]

WINDOW_SCHEDULES: tuple[str, ...] = (
    "progressive",  # MixGRPO: slide from noisy to clean every `interval` iterations
    "decay",  # progressive, the interval shrinking linearly as the window advances
    "exp_decay",  # progressive, the interval shrinking exponentially past a threshold
    "random",  # MixGRPO's random: a fresh window start every iteration
    "fixed",  # a frozen window (MixGRPO-Flash*: steps 0-3)
    "random_range",  # Flow-GRPO-Fast: random window inside [low, high)
    "random_subset",  # DanceGRPO: a random fraction of all trainable steps
    "stratified",  # AWM: `size` strata of [low, high or fraction x trainable), one step in each, per sample
    "all",  # Flow-GRPO: every trainable step
)


_PER_SAMPLE = ("random_subset", "stratified")


def _rng(seed: int, iteration: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(iteration), 0x6D6978, *map(int, more)])


@dataclass(frozen=True)
class WindowSchedule:
    """A schedule of trained (stochastic) steps over a ``num_steps``-step grid.

    Attributes:
        name: one of :data:`WINDOW_SCHEDULES`.
        num_steps: ``T``.
        size: window size ``w`` (window schedules only).
        stride: ``s``, how far the window moves each time it moves (MixGRPO: 1).
        interval: iterations spent at each window position (MixGRPO's ``iters_per_group``:
            25; Flash: 20). ``decay`` starts from it, ``exp_decay`` scales it.
        min_interval: ``decay``'s interval at the last position; default ``interval // 4``
            as the reference code.
        exp_decay_k, exp_decay_threshold: ``exp_decay``'s interval at start ``l`` is
            ``ceil(interval * exp(-k * max(0, l - threshold)))`` (reference: 0.1 and 13).
        start: the first window start (``fixed``: the frozen start).
        max_start: cap on the start. Default ``T - 1 - w``: the window keeps its size and
            never reaches the final step (the reference code caps the start at its
            ``max_timesteps`` and truncates the window there instead).
        rollback: past ``max_start``, jump back to ``start`` instead of staying there.
        low, high: ``random_range``: the window lies in ``[low, high)``.
        fraction: ``random_subset``'s share of the trainable steps (DanceGRPO 0.6 of
            ``T - 1``; DiffusionNFT 0.99 of ``T`` with ``final_step``); ``stratified``'s end
            when ``high`` is None (AWM: 0.9 of ``T``).
        per_sample: each sample draws its own steps (``random_subset``: DanceGRPO's
            reference draws a fresh permutation per sample and trains its first
            ``int(fraction (T - 1))`` steps; ``stratified`` is always per sample); see
            :meth:`sample_steps`.
        final_step: step ``T - 1`` is trainable too (forward-process losses only).
        seed: for the random schedules.
    """

    name: str
    num_steps: int
    size: int = 4
    stride: int = 1
    interval: int = 25
    min_interval: int | None = None
    exp_decay_k: float = 0.1
    exp_decay_threshold: int = 13
    start: int = 0
    max_start: int | None = None
    rollback: bool = False
    low: int = 0
    high: int | None = None
    fraction: float = 0.6
    per_sample: bool = False
    final_step: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WINDOW_SCHEDULES:
            raise ValueError(f"unknown window schedule {self.name!r}; choose one of {WINDOW_SCHEDULES}")
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(
                f"num_steps must be an integer >= 2 (a trainable step plus the final one), got {self.num_steps!r}"
            )
        trainable = self.trainable
        if self.per_sample and self.name not in _PER_SAMPLE:
            raise ValueError(f"per-sample step subsets need the random_subset schedule, not {self.name!r}")
        if self.name == "all":
            return
        if self.name == "stratified":
            high = self.stratified_high
            if not 0 <= self.low < high <= trainable or not 1 <= self.size <= high - self.low:
                raise ValueError(f"stratified needs 0 <= low < high <= {trainable} and 1 <= size <= high - low; "
                                 f"got low={self.low}, high={high}, size={self.size}")
            return
        if self.name == "random_subset":
            if not 0 < self.fraction <= 1:
                raise ValueError(f"random_subset fraction must be in (0, 1], got {self.fraction}")
            return
        if not 1 <= self.size <= trainable:
            raise ValueError(
                f"window size {self.size} must be in [1, {trainable}] for a {self.num_steps}-step grid "
                f"(the final step cannot be stochastic)"
            )
        if self.stride < 1 or self.interval < 1:
            raise ValueError(f"stride and interval must be >= 1, got {self.stride} and {self.interval}")
        if self.min_interval is not None and not 1 <= self.min_interval <= self.interval:
            raise ValueError(f"min_interval must be in [1, interval={self.interval}], got {self.min_interval}")
        if not self.exp_decay_k >= 0:
            raise ValueError(f"exp_decay_k must be >= 0, got {self.exp_decay_k}")
        top = trainable - self.size
        if self.max_start is not None and not 0 <= self.max_start <= top:
            raise ValueError(
                f"max_start {self.max_start} must be in [0, {top}] (a window of {self.size} ends before the final step)"
            )
        if not 0 <= self.start <= self.largest_start:
            raise ValueError(f"window start {self.start} must be in [0, {self.largest_start}] for size {self.size}")
        if self.name == "random_range":
            high = trainable if self.high is None else self.high
            if not (self.low >= 0 and self.low + self.size <= high <= trainable):
                raise ValueError(
                    f"random_range needs 0 <= low and low + size <= high <= {trainable}; "
                    f"got low={self.low}, high={high}, size={self.size}"
                )

    @property
    def stratified_high(self) -> int:
        """``stratified``'s end: ``high``, or ``int(fraction x trainable)`` (AWM: ``int(0.9 T)``)."""
        return self.high if self.high is not None else int(self.fraction * self.trainable)

    @property
    def trainable(self) -> int:
        """How many steps may train: ``T - 1``, or ``T`` with ``final_step``."""
        return self.num_steps if self.final_step else self.num_steps - 1

    @property
    def largest_start(self) -> int:
        return self.trainable - self.size if self.max_start is None else self.max_start

    def interval_at(self, start: int) -> int:
        """Iterations the window stays at ``start`` (``progressive``, ``decay``, ``exp_decay``)."""
        if self.name == "decay":
            # linear from `interval` at l = 0 to `min_interval` at the cap
            low = self.min_interval if self.min_interval is not None else max(1, self.interval // 4)
            progress = start / max(self.largest_start, 1)
            return max(low, int(self.interval * (1 - progress) + low * progress))
        if self.name == "exp_decay":
            excess = max(0, start - self.exp_decay_threshold)
            return max(1, math.ceil(self.interval * math.exp(-self.exp_decay_k * excess)))
        return self.interval

    def start_at(self, iteration: int) -> int:
        """The window start ``l`` at ``iteration`` (window schedules only)."""
        if not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
        cap = self.largest_start
        if self.name == "fixed":
            return self.start
        if self.name == "random":
            return int(_rng(self.seed, iteration).integers(self.start, cap + 1))
        if self.name == "random_range":
            high = self.trainable if self.high is None else self.high
            return int(_rng(self.seed, iteration).integers(self.low, high - self.size + 1))
        # l <- min(l + s, cap) after each position's interval, or back to `start` (rollback)
        positions = list(range(self.start, cap + 1, self.stride))
        if not self.rollback and positions[-1] != cap:
            positions.append(cap)
        durations = [self.interval_at(p) for p in positions]
        if self.rollback:
            iteration %= sum(durations)
        for position, duration in zip(positions, durations, strict=True):
            if iteration < duration:
                return position
            iteration -= duration
        return positions[-1]

    def steps(self, iteration: int) -> tuple[int, ...]:
        """Sorted indices of the trained (stochastic) steps at ``iteration``."""
        trainable = self.trainable
        if self.per_sample and self.name not in _PER_SAMPLE:
            raise ValueError(f"per-sample step subsets need the random_subset schedule, not {self.name!r}")
        if self.name == "all":
            return tuple(range(trainable))
        if self.name == "stratified":  # the union over samples
            return tuple(range(self.low, self.stratified_high))
        if self.name == "random_subset":
            if self.per_sample:  # the union over samples: any step may be some sample's
                return tuple(range(trainable))
            chosen = _rng(self.seed, iteration).choice(trainable, size=self.subset_size, replace=False)
            return tuple(sorted(int(k) for k in chosen))
        start = self.start_at(iteration)
        return tuple(range(start, start + self.size))


    @property
    def subset_size(self) -> int:
        """Steps trained per sample: ``random_subset``'s ``max(1, int(fraction x trainable))``,
        ``stratified``'s ``size``."""
        if self.name == "stratified":
            return self.size
        return max(1, int(self.fraction * self.trainable))

    @property
    def sampled_per_sample(self) -> bool:
        """Whether each sample draws its own steps (:meth:`sample_steps`)."""
        return self.per_sample or self.name == "stratified"

    def _stratified(self, rng: np.random.Generator) -> list[int]:
        """AWM's ``discrete_wo_init`` draw (scxue/advantage_weighted_matching @ be51372,
        ``scripts/train_sd3_awm.py``): stratum bounds ``int(linspace(low, high, size + 1))``,
        one index uniform in each ``[lower, upper)``."""
        bounds = np.linspace(self.low, self.stratified_high, self.size + 1).astype(np.int64)
        u = rng.random(self.size)
        return [int(lo + np.floor(x * (hi - lo))) for lo, hi, x in zip(bounds[:-1], bounds[1:], u, strict=True)]

    def sample_steps(self, iteration: int, sample_ids: Sequence[int]) -> np.ndarray:
        """``(n, trainable)`` bool: which trainable steps each sample trains at ``iteration``.

        With ``per_sample`` each sample (by its id, e.g. its row in the whole batch, so the
        draw does not depend on the rank that holds it) gets its own subset; otherwise
        every row repeats :meth:`steps`."""
        trainable = self.trainable
        mask = np.zeros((len(sample_ids), trainable), dtype=bool)
        if not self.sampled_per_sample:
            mask[:, list(self.steps(iteration))] = True
            return mask
        for row, sid in enumerate(sample_ids):
            rng = _rng(self.seed, iteration, 1, sid)
            mask[row, self._stratified(rng) if self.name == "stratified" else rng.permutation(trainable)[: self.subset_size]] = True
        return mask


def make_window_schedule(name: str, num_steps: int, **kwargs) -> WindowSchedule:
    """Build a schedule by name; unknown names and bad sizes raise ``ValueError``."""
    return WindowSchedule(name=name, num_steps=num_steps, **kwargs)

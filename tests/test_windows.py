"""Window schedules: property tests over random parameters, plus the reference behaviours."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixgrpo.core.windows import WINDOW_SCHEDULES, make_window_schedule


@st.composite
def schedules(draw, names=WINDOW_SCHEDULES):
    name = draw(st.sampled_from(names))
    num_steps = draw(st.integers(2, 40))
    trainable = num_steps - 1
    size = draw(st.integers(1, trainable))
    kwargs = dict(
        size=size,
        stride=draw(st.integers(1, 4)),
        interval=draw(st.integers(1, 30)),
        rollback=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
        fraction=draw(st.floats(0.05, 1.0)),
    )
    top = trainable - size
    kwargs["max_start"] = draw(st.one_of(st.none(), st.integers(0, top)))
    cap = top if kwargs["max_start"] is None else kwargs["max_start"]
    kwargs["start"] = draw(st.integers(0, cap))
    if name in ("random_range", "stratified"):
        kwargs["low"] = draw(st.integers(0, top))
        kwargs["high"] = draw(st.integers(kwargs["low"] + size, trainable))
    return make_window_schedule(name, num_steps, **kwargs)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(schedules(), st.integers(0, 2000))
def test_steps_stay_inside_the_grid_and_off_the_final_step(schedule, iteration):
    steps = schedule.steps(iteration)
    assert steps, "a schedule must train at least one step"
    assert list(steps) == sorted(set(steps))
    assert steps[0] >= 0 and steps[-1] <= schedule.num_steps - 2  # never the step to t = 0
    if schedule.name == "stratified":  # the union of the strata; each sample takes one step per stratum
        mask = schedule.sample_steps(iteration, range(5))
        assert (mask.sum(1) == schedule.size).all() and set(np.flatnonzero(mask.any(0))) <= set(steps)
    elif schedule.name not in ("all", "random_subset"):
        assert len(steps) == schedule.size
        assert list(steps) == list(range(steps[0], steps[0] + schedule.size))
        if schedule.name == "random_range":
            high = schedule.num_steps - 1 if schedule.high is None else schedule.high
            assert schedule.low <= steps[0] and steps[-1] < high
        else:
            assert schedule.start <= steps[0] <= schedule.largest_start


@settings(max_examples=200, deadline=None, derandomize=True)
@given(schedules(), st.integers(0, 500))
def test_schedules_are_reproducible(schedule, iteration):
    same = make_window_schedule(**{f: getattr(schedule, f) for f in schedule.__dataclass_fields__})
    assert schedule.steps(iteration) == same.steps(iteration)


SLIDING = ("progressive", "decay", "exp_decay")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(schedules(SLIDING))
def test_sliding_windows_hold_each_position_for_its_interval_then_move_by_the_stride(schedule):
    """``l <- min(l + s, l_max)`` after ``interval_at(l)`` iterations at ``l`` (or back to the
    start past the cap with rollback), checked on every sliding schedule drawn."""
    cap, start = schedule.largest_start, schedule.start
    starts = [schedule.start_at(i) for i in range(600)]
    assert starts[0] == start
    single = start == cap or (schedule.rollback and start + schedule.stride > cap)
    if single:
        assert set(starts) == {start}  # one position only: the window never moves
    runs = [(k, len(list(g))) for k, g in itertools.groupby(starts)]  # (position, iterations held)
    for (pos, held), (nxt, _) in itertools.pairwise(runs):
        assert held == schedule.interval_at(pos), (pos, held)  # every position lasts its interval
        if schedule.rollback and pos + schedule.stride > cap:
            assert nxt == start  # past the cap: back to the start
        else:
            assert nxt == min(pos + schedule.stride, cap)
    last, held = runs[-1]
    assert single or held <= schedule.interval_at(last) or (last == cap and not schedule.rollback)
    if not schedule.rollback:
        reached = sum(schedule.interval_at(p) for p, _ in runs[:-1])
        if reached < 600:  # once at the cap the window stays there
            assert runs[-1][0] == cap and all(x == cap for x in starts[reached:])
    for i in (0, 7, 599):
        assert schedule.steps(i) == tuple(range(starts[i], starts[i] + schedule.size))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(schedules(tuple(n for n in WINDOW_SCHEDULES if n not in SLIDING)))
def test_the_other_schedules_train_what_they_promise(schedule):
    trainable = schedule.num_steps - 1
    seen = [schedule.steps(i) for i in range(200)]
    if schedule.name == "all":
        assert set(seen) == {tuple(range(trainable))}
    elif schedule.name == "random_subset":
        assert {len(s) for s in seen} == {max(1, int(schedule.fraction * trainable))}
        if 0 < len(seen[0]) < trainable:
            assert len(set(seen)) > 1  # drawn afresh each iteration
    elif schedule.name == "fixed":
        assert set(seen) == {tuple(range(schedule.start, schedule.start + schedule.size))}
    elif schedule.name == "stratified":  # steps() is the union; the draws are per sample
        high = trainable if schedule.high is None else schedule.high
        assert set(seen) == {tuple(range(schedule.low, high))}
        draws = [tuple(np.flatnonzero(m)) for i in range(20) for m in schedule.sample_steps(i, range(4))]
        assert all(len(d) == schedule.size and schedule.low <= d[0] and d[-1] < high for d in draws)
        if high - schedule.low > schedule.size:
            assert len(set(draws)) > 1
    else:
        low, high = ((schedule.start, schedule.largest_start + schedule.size) if schedule.name == "random"
                     else (schedule.low, schedule.num_steps - 1 if schedule.high is None else schedule.high))
        assert all(low <= s[0] and s[-1] < high for s in seen)
        if high - low > schedule.size:  # more than one place the window fits: it moves
            assert len({s[0] for s in seen}) > 1


def test_progressive_matches_mixgrpo():
    """T = 25, w = 4, stride 1, moves every 25 iterations, from the noisiest step."""
    sched = make_window_schedule("progressive", 25, size=4, stride=1, interval=25)
    assert sched.steps(0) == (0, 1, 2, 3)
    assert sched.steps(24) == (0, 1, 2, 3)
    assert sched.steps(25) == (1, 2, 3, 4)
    assert sched.steps(299) == (11, 12, 13, 14)  # 300 iterations cover steps 0-14 (design.md)
    assert sched.steps(10_000) == (20, 21, 22, 23)  # capped: never the final step 24


def test_rollback_returns_to_the_start():
    sched = make_window_schedule("progressive", 10, size=2, stride=3, interval=2, rollback=True, start=1)
    starts = [sched.start_at(i) for i in range(12)]
    assert starts == [1, 1, 4, 4, 7, 7, 1, 1, 4, 4, 7, 7]


def test_decay_interval_shrinks_linearly_and_exp_decay_past_threshold():
    decay = make_window_schedule("decay", 25, size=4, interval=10, min_interval=1)
    intervals = [decay.interval_at(start) for start in range(decay.largest_start + 1)]
    assert intervals[0] == 10 and intervals[-1] == 1
    assert all(a >= b for a, b in itertools.pairwise(intervals))
    assert make_window_schedule("decay", 25, interval=20).interval_at(20) == 5  # default min = interval // 4

    exp = make_window_schedule("exp_decay", 25, size=4, interval=25, exp_decay_k=0.1, exp_decay_threshold=13)
    assert [exp.interval_at(start) for start in (0, 13)] == [25, 25]
    assert exp.interval_at(20) == math.ceil(25 * math.exp(-0.7))


def test_random_windows_vary_with_iteration_and_seed_but_not_with_rank():
    a = make_window_schedule("random", 25, size=4, seed=7)
    b = make_window_schedule("random", 25, size=4, seed=7)  # another rank, same config
    c = make_window_schedule("random", 25, size=4, seed=8)
    starts_a = [a.start_at(i) for i in range(50)]
    assert starts_a == [b.start_at(i) for i in range(50)]
    assert starts_a != [c.start_at(i) for i in range(50)]
    assert len(set(starts_a)) > 5


def test_dance_subset_is_sixty_percent_and_fresh_each_iteration():
    sched = make_window_schedule("random_subset", 25, fraction=0.6, seed=0)
    subsets = {sched.steps(i) for i in range(20)}
    assert all(len(s) == 14 for s in subsets) and len(subsets) > 15


def test_flow_grpo_fast_window_stays_in_its_range():
    sched = make_window_schedule("random_range", 10, size=2, low=0, high=5, seed=3)
    for i in range(100):
        steps = sched.steps(i)
        assert steps[0] >= 0 and steps[-1] < 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="sliding"), "unknown window schedule 'sliding'"),
        (dict(name="progressive", size=25), r"window size 25 must be in \[1, 24\]"),
        (dict(name="progressive", size=0), r"window size 0 must be in \[1, 24\]"),
        (dict(name="progressive", stride=0), "stride and interval must be >= 1"),
        (dict(name="progressive", max_start=21), r"max_start 21 must be in \[0, 20\]"),
        (dict(name="progressive", start=21), r"window start 21 must be in \[0, 20\]"),
        (dict(name="random_subset", fraction=0.0), r"fraction must be in \(0, 1\]"),
        (dict(name="random_range", low=3, high=5), "random_range needs"),
        (dict(name="decay", min_interval=30), r"min_interval must be in \[1, interval=25\]"),
    ],
)
def test_bad_schedules_raise(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_window_schedule(name, 25, **kwargs)


def test_bad_iteration_and_tiny_grid():
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        make_window_schedule("progressive", 25).steps(-1)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 2"):
        make_window_schedule("all", 1)

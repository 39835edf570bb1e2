"""Save policies (issue 16): pure rules, property-tested, and the manager skipping saves with
a reason (``pending.skipped``/``pending.reason``), TF's ``checkpoint_interval`` as one of them."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.save_policy import (
    AnyOf,
    AtSteps,
    IntervalSeconds,
    IntervalSteps,
    LastSave,
    SavePolicy,
    decide_save,
)

steps_st = st.lists(st.integers(0, 10_000), min_size=1, max_size=60, unique=True).map(sorted)


def run(policy: SavePolicy, steps: list[int], times: list[float] | None = None) -> list[int]:
    """The steps a manager following ``policy`` writes, as it would decide them."""
    written: list[int] = []
    last: LastSave | None = None
    for i, step in enumerate(steps):
        now = times[i] if times is not None else float(step)
        if policy.should_save(step, now, last):
            written.append(step)
            last = LastSave(step, now)
    return written


@settings(max_examples=300, deadline=None)
@given(steps=steps_st, n=st.integers(1, 500))
def test_interval_steps_writes_every_step_n_after_the_last(steps: list[int], n: int) -> None:
    written = run(IntervalSteps(n), steps)
    assert written[0] == steps[0]  # the first save always writes
    assert all(b - a >= n for a, b in itertools.pairwise(written))  # never closer than n
    for step in steps:  # a skipped step is within n of the last written one before it
        if step not in written:
            before = max(w for w in written if w < step)
            assert step - before < n


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=60),
    seconds=st.floats(0.1, 200),
)
def test_interval_seconds_spaces_saves_by_time(gaps: list[float], seconds: float) -> None:
    times = list(np.cumsum(gaps))
    steps = list(range(len(times)))
    written = run(IntervalSeconds(seconds), steps, times)
    assert written[0] == 0
    at = dict(zip(steps, times, strict=False))
    assert all(at[b] - at[a] >= seconds for a, b in itertools.pairwise(written))
    for step in steps:
        if step not in written:
            before = max(w for w in written if w < step)
            assert at[step] - at[before] < seconds


@settings(max_examples=200, deadline=None)
@given(steps=steps_st, listed=st.sets(st.integers(0, 10_000), max_size=30))
def test_at_steps_writes_exactly_the_listed_steps(steps: list[int], listed: set[int]) -> None:
    assert run(AtSteps(listed), steps) == [s for s in steps if s in listed]


policies = st.one_of(
    st.integers(1, 300).map(IntervalSteps),
    st.floats(1, 300).map(IntervalSeconds),
    st.sets(st.integers(0, 10_000), max_size=10).map(AtSteps),
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(policies, min_size=1, max_size=4),
    step=st.integers(0, 10_000),
    now=st.floats(0, 1e6),
    last=st.none() | st.builds(LastSave, st.integers(0, 10_000), st.none() | st.floats(0, 1e6)),
)
def test_any_of_writes_when_any_part_would(
    parts: list[SavePolicy], step: int, now: float, last: LastSave | None
) -> None:
    combined = AnyOf(*parts)
    assert combined.should_save(step, now, last) == any(
        p.should_save(step, now, last) for p in parts
    )
    if len(parts) >= 2:  # | flattens into one AnyOf
        assert (parts[0] | parts[1]).policies == (parts[0], parts[1])
    # A forced save (a preemption signal) writes whatever the policy says.
    assert decide_save(combined, step, now, last, forced_by="SIGTERM").save
    assert decide_save(None, step, now, last).save


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: IntervalSteps(0), ValueError),
        (lambda: IntervalSteps(2.5), TypeError),  # type: ignore[arg-type]
        (lambda: IntervalSteps(True), TypeError),
        (lambda: IntervalSeconds(-1), ValueError),
        (lambda: IntervalSeconds(float("inf")), ValueError),
        (lambda: AtSteps([-1]), ValueError),
        (lambda: AnyOf(), ValueError),
        (lambda: AnyOf(3), TypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_policies_are_refused(make: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        make()


# -- in the manager --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_manager_skips_what_the_policy_skips_and_says_why() -> None:
    clock = Clock()
    policy = IntervalSteps(10) | IntervalSeconds(60) | AtSteps({3})
    directory = f"memory://save-policy-{uuid.uuid4().hex}"
    with anyckpt.sync.CheckpointManager(
        directory, max_to_keep=None, save_policy=policy, clock=clock
    ) as manager:
        outcome = {}
        for step in range(1, 26):
            clock.now += 5 if step != 17 else 100  # a slow step before 17
            pending = manager.save({"w": np.full(2, step)}, step=step)
            outcome[step] = (pending.skipped, pending.reason)
        manager.wait()
        kept = [int(p.rsplit("-", 1)[1]) for p in manager.checkpoints]
    # 1 (the first), 3 (listed), 13 (10 steps after 3), 17 (115 s after 13); 18-25 are
    # fewer than 10 steps and 60 s after 17.
    expected = run_manager_rule(policy, 25)
    assert kept == expected == [1, 3, 13, 17]
    assert outcome[2][0]
    assert "interval 10" in outcome[2][1]
    assert not outcome[3][0]
    assert outcome[3][1] == "step 3 is listed"
    assert not outcome[17][0]
    assert "s after the last save" in outcome[17][1]
    skipped = [s for s, (sk, _) in outcome.items() if sk]
    assert sorted(set(skipped) | set(kept)) == list(range(1, 26))
    assert not set(skipped) & set(kept)


def run_manager_rule(policy: SavePolicy, last_step: int) -> list[int]:
    times, now = [], 1_000_000.0
    for step in range(1, last_step + 1):
        now += 5 if step != 17 else 100
        times.append(now)
    return run(policy, list(range(1, last_step + 1)), times)


def test_checkpoint_interval_is_interval_steps_and_excludes_save_policy() -> None:
    with pytest.raises(ValueError, match="either save_policy= or checkpoint_interval="):
        anyckpt.CheckpointManager("memory://x", checkpoint_interval=2, save_policy=AtSteps({1}))
    with pytest.raises(TypeError, match="save_policy must be"):
        anyckpt.CheckpointManager("memory://x", save_policy=5)
    directory = f"memory://save-policy-{uuid.uuid4().hex}"
    with anyckpt.sync.CheckpointManager(directory, checkpoint_interval=3) as manager:
        skipped = [manager.save({"w": np.zeros(1)}, step=s).skipped for s in range(7)]
    assert skipped == [False, True, True, False, True, True, False]


def test_after_a_restart_interval_steps_counts_from_the_latest_checkpoint() -> None:
    directory = f"memory://save-policy-{uuid.uuid4().hex}"
    with anyckpt.sync.CheckpointManager(directory, save_policy=IntervalSteps(5)) as manager:
        manager.save({"w": np.zeros(1)}, step=10).wait()
    with anyckpt.sync.CheckpointManager(directory, save_policy=IntervalSteps(5)) as manager:
        assert manager.save({"w": np.zeros(1)}, step=12).skipped
        assert not manager.save({"w": np.zeros(1)}, step=15).skipped

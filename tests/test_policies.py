"""Composable retention policies (issue 16): each policy's rule, the invariants every policy and
combination keeps, TensorFlow's pair reproduced exactly, and the manager applying them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.retention import (
    Any,
    BestN,
    Candidate,
    EveryNHours,
    EveryNSteps,
    KeepFor,
    LatestN,
    Policy,
    RetentionPolicy,
    Steps,
    Tracked,
    apply_retention,
    decide,
    record_save,
    tf_policy,
)

HOUR = 3600.0
times = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
metric_values = st.one_of(st.floats(-10, 10), st.just(math.nan))


@st.composite
def candidate_lists(draw: st.DrawFn, max_size: int = 12) -> list[Candidate]:
    """Tracked checkpoints, oldest first: increasing steps and times, some metrics."""
    steps = sorted(draw(st.lists(st.integers(0, 60), unique=True, max_size=max_size)))
    stamps = sorted(draw(st.lists(times, min_size=len(steps), max_size=len(steps))))
    out = []
    for step, ts in zip(steps, stamps, strict=True):
        metrics = draw(st.dictionaries(st.sampled_from(["loss", "acc"]), metric_values))
        out.append(Candidate(f"ckpt-{step}", ts, step, metrics))
    return out


leaves: st.SearchStrategy[Policy] = st.one_of(
    st.builds(LatestN, st.integers(1, 5)),
    st.builds(EveryNSteps, st.integers(1, 7)),
    st.builds(
        BestN, st.integers(1, 3), st.sampled_from(["loss", "acc"]), st.sampled_from(["min", "max"])
    ),
    st.builds(KeepFor, st.floats(0, 1e9)),
    st.builds(Steps, st.frozensets(st.integers(0, 60), max_size=5)),
)
hours = st.builds(EveryNHours, st.floats(min_value=0.01, max_value=48.0))


@st.composite
def any_policy(draw: st.DrawFn) -> Policy:
    parts = draw(st.lists(leaves, min_size=1, max_size=4))
    if draw(st.booleans()):
        parts.append(draw(hours))
    if len(parts) == 1:
        return parts[0]
    if draw(st.booleans()):  # nested Any flattens
        return Any(Any(*parts[:1]), *parts[1:])
    return Any(*parts)


def paths(items: Sequence[Tracked | Candidate]) -> list[str]:
    return [t.path for t in items]


# --- invariants, for every policy and combination ------------------------------------------


@settings(max_examples=300, deadline=None)
@given(candidate_lists(), times, times, any_policy(), st.data())
def test_invariants_of_every_policy(
    cands: list[Candidate], lp: float, now: float, policy: Policy, data: st.DataObject
) -> None:
    latest = data.draw(st.sampled_from([None, *paths(cands)]))
    plan = decide(cands, lp, policy, now=now, latest=latest, explain=True)
    d = plan.decision
    # Every tracked checkpoint lands in exactly one bucket; nothing untracked is in any.
    buckets = [*d.keep, *d.preserve, *d.delete]
    assert sorted(paths(buckets)) == sorted(paths(cands))
    assert set(plan.reasons) == set(paths(cands))
    # The latest committed checkpoint is never deleted (nor untracked).
    if latest is not None:
        assert latest in paths(d.keep)
    # Whatever a member policy keeps stays tracked.
    for part in policy.parts():
        assert set(part.keep(cands, now)) <= set(paths(d.keep))
    # Buckets stay oldest first; preserved ones are spaced as TensorFlow spaces them.
    for bucket in (d.keep, d.preserve, d.delete):
        assert paths(bucket) == [c for c in paths(cands) if c in paths(bucket)]
    h = policy.preserve_hours
    if not h:
        assert d.preserve == ()
        assert d.last_preserved_timestamp == lp
    previous = lp
    for p in d.preserve:
        assert p.timestamp - (h or 0) * HOUR >= previous
        previous = p.timestamp
    assert d.last_preserved_timestamp == previous


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.0, 3.0), max_size=25), any_policy(), st.data())
def test_saving_sequence_never_deletes_the_newest_or_untracked(
    gaps: list[float], policy: Policy, data: st.DataObject
) -> None:
    """Driven as a manager drives it: record the save, decide, keep what stays."""
    tracked: list[Candidate] = []
    lp, clock = 0.0, 0.0
    for step, gap in enumerate(gaps):
        clock += gap * HOUR
        metrics = data.draw(st.dictionaries(st.sampled_from(["loss", "acc"]), metric_values))
        name = f"ckpt-{step}"
        new = Candidate(name, clock, step, metrics)
        cands = [*tracked, new]
        d = decide(cands, lp, policy, now=clock, latest=name).decision
        assert name in paths(d.keep)  # resume always works
        assert set(paths(d.delete)) <= set(paths(cands))
        by_path = {c.path: c for c in cands}
        tracked = [by_path[t.path] for t in d.keep]
        lp = d.last_preserved_timestamp


# --- TensorFlow's pair, exactly -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.floats(0.0, 3.0)), max_size=30),
    st.one_of(st.none(), st.integers(1, 6)),
    st.one_of(st.none(), st.floats(0.0, 5.0)),
    times,
)
def test_tf_policy_equals_tensorflow_rules(
    saves: list[tuple[str, float]], n: int | None, h: float | None, lp: float
) -> None:
    """Save by save, the composed policy decides what apply_retention (TF's rules) decides."""
    reference = RetentionPolicy(n, h)
    policy = tf_policy(n, h)
    tracked: list[Tracked] = []
    clock = 0.0
    for name, gap in saves:
        clock += gap * HOUR
        tracked = record_save(tracked, name, clock)
        expected = apply_retention(tracked, lp, reference)
        cands = [Candidate(t.path, t.timestamp) for t in tracked]
        got = decide(cands, lp, policy, now=clock, latest=name).decision
        assert got == expected
        tracked, lp = list(got.keep), got.last_preserved_timestamp


def test_tf_policy_shapes() -> None:
    assert tf_policy(None, 2.0) is None
    assert tf_policy(3, None) == LatestN(3)
    assert tf_policy(3, 0.0) == LatestN(3)  # TF tests truthiness
    assert tf_policy(3, 2.0) == Any(LatestN(3), EveryNHours(2.0))
    with pytest.raises(ValueError, match="max_to_keep"):
        tf_policy(0, None)


# --- each policy's rule ---------------------------------------------------------------------


@given(candidate_lists(), st.integers(1, 8))
def test_latest_n_keeps_the_newest_n(cands: list[Candidate], n: int) -> None:
    kept = LatestN(n).keep(cands, 0.0)
    assert list(kept) == paths(cands)[-n:] if cands else kept == {}


@given(candidate_lists(), st.floats(0.01, 10.0), times)
def test_every_n_hours_keeps_nothing_tracked_and_preserves_spaced(
    cands: list[Candidate], h: float, lp: float
) -> None:
    policy = EveryNHours(h)
    assert policy.keep(cands, 0.0) == {}
    d = decide(cands, lp, policy, now=0.0, latest=None).decision
    assert d.keep == ()  # alone, it keeps nothing tracked: each goes or is preserved
    chain, last = [], lp
    for c in cands:
        if c.timestamp - h * HOUR >= last:
            chain.append(c.path)
            last = c.timestamp
    assert paths(d.preserve) == chain


@given(candidate_lists(), st.integers(1, 10))
def test_every_n_steps_keeps_multiples(cands: list[Candidate], k: int) -> None:
    kept = EveryNSteps(k).keep(cands, 0.0)
    assert set(kept) == {c.path for c in cands if c.step is not None and c.step % k == 0}


@given(candidate_lists(), st.integers(1, 4), st.sampled_from(["min", "max"]))
def test_best_n_keeps_the_best_values(cands: list[Candidate], n: int, mode: str) -> None:
    policy = BestN(n, "loss", mode)  # type: ignore[arg-type]
    kept = policy.keep(cands, 0.0)
    scored = [c for c in cands if "loss" in c.metrics and not math.isnan(c.metrics["loss"])]
    assert len(kept) == min(n, len(scored))
    assert set(kept) <= {c.path for c in scored}
    worse = (lambda a, b: a > b) if mode == "min" else (lambda a, b: a < b)
    for c in scored:  # nothing left out is strictly better than something kept
        if c.path not in kept:
            assert all(
                not worse(cands[paths(cands).index(k)].metrics["loss"], c.metrics["loss"])
                for k in kept
            )


def test_best_n_ties_go_to_the_newer_and_missing_metrics_never_count() -> None:
    cands = [
        Candidate("ckpt-1", 1.0, 1, {"loss": 0.5}),
        Candidate("ckpt-2", 2.0, 2, {}),
        Candidate("ckpt-3", 3.0, 3, {"loss": 0.5}),
        Candidate("ckpt-4", 4.0, 4, {"loss": math.nan}),
    ]
    assert list(BestN(1, "loss").keep(cands, 0.0)) == ["ckpt-3"]
    assert list(BestN(1, "loss", "max").keep(cands, 0.0)) == ["ckpt-3"]
    assert set(BestN(5, "loss").keep(cands, 0.0)) == {"ckpt-1", "ckpt-3"}


def test_best_n_with_max_to_keep_never_evicts_the_newest() -> None:
    """Orbax's surprise: best-N evicting the newest step, which breaks resume."""
    cands = [Candidate(f"ckpt-{s}", float(s), s, {"loss": float(s)}) for s in range(1, 6)]
    plan = decide(cands, 0.0, BestN(2, "loss"), now=10.0, latest="ckpt-5", explain=True)
    assert paths(plan.decision.keep) == ["ckpt-1", "ckpt-2", "ckpt-5"]
    assert "latest" in plan.reasons["ckpt-5"]
    assert "not among the best 2" in plan.reasons["ckpt-3"]


@given(candidate_lists(), st.floats(0, 1e9), times)
def test_keep_for_keeps_what_is_younger_than_the_ttl(
    cands: list[Candidate], ttl: float, now: float
) -> None:
    kept = KeepFor(ttl).keep(cands, now)
    assert set(kept) == {c.path for c in cands if now - c.timestamp < ttl}


@given(candidate_lists(), st.frozensets(st.integers(0, 60)))
def test_steps_keeps_the_listed_steps(cands: list[Candidate], steps: frozenset[int]) -> None:
    kept = Steps(steps).keep(cands, 0.0)
    assert set(kept) == {c.path for c in cands if c.step in steps}


@given(candidate_lists(), st.lists(leaves, min_size=1, max_size=4), times)
def test_any_keeps_the_union(cands: list[Candidate], parts: list[Policy], now: float) -> None:
    kept = Any(*parts).keep(cands, now)
    union: set[str] = set()
    for p in parts:
        union |= set(p.keep(cands, now))
    assert set(kept) == union


@pytest.mark.parametrize(
    "make",
    [
        lambda: LatestN(0),
        lambda: LatestN(True),
        lambda: EveryNHours(0),
        lambda: EveryNHours(math.inf),
        lambda: EveryNSteps(-1),
        lambda: BestN(1, ""),
        lambda: BestN(1, "loss", "median"),
        lambda: KeepFor(-1),
        lambda: Steps([-1]),
        lambda: Any(),
        lambda: Any(EveryNHours(1), Any(EveryNHours(2))),
    ],
)
def test_bad_policies_are_refused(make: object) -> None:
    with pytest.raises(ValueError, match=r"must|needs|at most|takes"):
        make()  # type: ignore[operator]


def test_any_refuses_non_policies() -> None:
    with pytest.raises(TypeError):
        Any(LatestN(1), 3)  # type: ignore[arg-type]


def test_no_policy_keeps_everything() -> None:
    cands = [Candidate(f"ckpt-{s}", float(s), s) for s in range(3)]
    d = decide(cands, 7.0, None, now=0.0).decision
    assert paths(d.keep) == paths(cands)
    assert d.last_preserved_timestamp == 7.0


# --- the manager ----------------------------------------------------------------------------


def on_disk(directory: Path) -> list[str]:
    names = [n[: -len(".index")] for n in os.listdir(directory) if n.endswith(".index")]
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))


def test_manager_applies_a_composed_policy(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    retention = Any(LatestN(2), EveryNSteps(4), Steps({1}))
    with anyckpt.sync.CheckpointManager(directory, retention=retention) as m:
        for step in range(1, 11):
            m.save({"w": np.full(3, step, np.float32)}, step=step).wait()
        assert [p.rsplit("/", 1)[-1] for p in m.checkpoints] == [
            "ckpt-1",
            "ckpt-4",
            "ckpt-8",
            "ckpt-9",
            "ckpt-10",
        ]
    assert on_disk(directory) == ["ckpt-1", "ckpt-4", "ckpt-8", "ckpt-9", "ckpt-10"]
    # A manager reopening the directory (with TF's default) continues from the state file.
    with anyckpt.sync.CheckpointManager(directory, max_to_keep=1) as m:
        assert m.latest_step == 10
        m.save({"w": np.zeros(3, np.float32)}, step=11).wait()
    assert on_disk(directory) == ["ckpt-11"]


def test_manager_refuses_retention_with_tf_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either retention"):
        anyckpt.CheckpointManager(tmp_path, max_to_keep=3, retention=LatestN(2))
    with pytest.raises(TypeError):
        anyckpt.CheckpointManager(tmp_path, retention=3)  # type: ignore[arg-type]


def test_manager_keep_for_uses_its_clock(tmp_path: Path) -> None:
    now = [1_000_000.0]
    with anyckpt.sync.CheckpointManager(
        tmp_path / "ttl", retention=KeepFor(2 * HOUR), clock=lambda: now[0]
    ) as m:
        for step in range(1, 6):
            now[0] += HOUR
            m.save({"w": np.zeros(1)}, step=step).wait()
        # At the last save (t0 + 5 h) those saved less than 2 h before stay: steps 4 and 5.
        assert [p.rsplit("/", 1)[-1] for p in m.checkpoints] == ["ckpt-4", "ckpt-5"]

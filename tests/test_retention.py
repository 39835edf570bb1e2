"""Tests for the pure retention policy (TensorFlow ``CheckpointManager`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.codecs.state_file import CheckpointState, decode_state, encode_state
from anyckpt.retention import (
    RecoveredState,
    RetentionDecision,
    RetentionPolicy,
    Tracked,
    apply_retention,
    record_save,
    recover,
    start_fresh,
)

HOUR = 3600.0


def fixture_state(case: str) -> tuple[bytes, CheckpointState]:
    path = FIXTURES / case / "checkpoint"
    data = path.read_bytes()
    return data, decode_state(data)


def save_many(
    policy: RetentionPolicy, saves: Sequence[tuple[str, float]], last_preserved: float
) -> tuple[list[Tracked], list[Tracked], list[Tracked], float]:
    """Drive record_save + apply_retention like a manager; return kept/preserved/deleted."""
    tracked: list[Tracked] = []
    preserved: list[Tracked] = []
    deleted: list[Tracked] = []
    for path, ts in saves:
        decision = apply_retention(record_save(tracked, path, ts), last_preserved, policy)
        tracked = list(decision.keep)
        preserved += decision.preserve
        deleted += decision.delete
        last_preserved = decision.last_preserved_timestamp
    return tracked, preserved, deleted, last_preserved


def paths(items: Sequence[Tracked]) -> list[str]:
    return [t.path for t in items]


# --- TensorFlow fixtures -------------------------------------------------------------------


def test_tf2_object_fixture_state_is_reproduced_byte_for_byte() -> None:
    """CheckpointManager(max_to_keep=3), 4 saves: ckpt-2..4 remain, same state-file bytes."""
    data, tf_state = fixture_state("tf2_object")
    t2, t3, t4 = tf_state.all_model_checkpoint_timestamps
    t1 = t2 - 1.1  # not in the file: it was deleted
    start = RecoveredState((), tf_state.last_preserved_timestamp, ())
    saves = [("ckpt-1", t1), ("ckpt-2", t2), ("ckpt-3", t3), ("ckpt-4", t4)]
    kept, preserved, deleted, lp = save_many(
        RetentionPolicy(max_to_keep=3), saves, start.last_preserved_timestamp
    )
    assert paths(kept) == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert paths(deleted) == ["ckpt-1"]
    assert preserved == []
    ours = CheckpointState(kept[-1].path, tuple(paths(kept)), tuple(t.timestamp for t in kept), lp)
    assert encode_state(ours) == data


def test_v2_max_to_keep_fixture_state_is_reproduced_byte_for_byte() -> None:
    """max_to_keep=2, steps 1..4 (1.1 s apart): model.ckpt-3 and -4 remain."""
    data, _ = fixture_state("v2_max_to_keep")
    saves = [(f"model.ckpt-{i}", 1000.0 + 1.1 * i) for i in range(1, 5)]
    kept, preserved, deleted, _ = save_many(RetentionPolicy(max_to_keep=2), saves, 999.0)
    assert paths(kept) == ["model.ckpt-3", "model.ckpt-4"]
    assert paths(deleted) == ["model.ckpt-1", "model.ckpt-2"]
    assert preserved == []
    # The tf.compat.v1 Saver writes no timestamps.
    assert encode_state(CheckpointState(kept[-1].path, tuple(paths(kept)))) == data


def test_recover_tf2_object_fixture_adopts_every_checkpoint() -> None:
    _, s = fixture_state("tf2_object")
    now = s.all_model_checkpoint_timestamps[-1] + 60
    got = recover(
        s.all_model_checkpoint_paths,
        s.all_model_checkpoint_timestamps,
        s.last_preserved_timestamp,
        now,
    )
    assert got.tracked == tuple(
        Tracked(p, t)
        for p, t in zip(
            s.all_model_checkpoint_paths, s.all_model_checkpoint_timestamps, strict=True
        )
    )
    assert got.last_preserved_timestamp == s.last_preserved_timestamp
    assert got.forgotten == ()


def test_recover_saver_fixture_adopts_nothing() -> None:
    """No timestamps and last_preserved 0: TF's manager tracks none of the Saver's files."""
    _, s = fixture_state("v2_max_to_keep")
    got = recover(s.all_model_checkpoint_paths, (), s.last_preserved_timestamp, 1.8e9)
    assert got.tracked == ()
    assert got.last_preserved_timestamp == 0.0
    assert got.forgotten == ("model.ckpt-3", "model.ckpt-4")


# --- sweeping ------------------------------------------------------------------------------


def test_max_to_keep_none_keeps_everything_and_leaves_last_preserved() -> None:
    tracked = [Tracked(f"c{i}", float(i)) for i in range(10)]
    policy = RetentionPolicy(max_to_keep=None, keep_checkpoint_every_n_hours=0.0001)
    decision = apply_retention(tracked, -5.0, policy)
    assert decision == RetentionDecision(tuple(tracked), (), (), -5.0)


def test_under_the_limit_nothing_changes() -> None:
    tracked = [Tracked("a", 1.0), Tracked("b", 2.0)]
    decision = apply_retention(tracked, 0.0, RetentionPolicy(max_to_keep=2))
    assert decision == RetentionDecision(tuple(tracked), (), (), 0.0)


def test_oldest_are_deleted_first() -> None:
    tracked = [Tracked(f"c{i}", float(i)) for i in range(5)]
    decision = apply_retention(tracked, 0.0, RetentionPolicy(max_to_keep=2))
    assert paths(decision.keep) == ["c3", "c4"]
    assert paths(decision.delete) == ["c0", "c1", "c2"]
    assert decision.preserve == ()


def test_keep_every_n_hours_preserves_spaced_checkpoints() -> None:
    # Saves every 30 minutes, n = 1 hour, last preserved at t=0.
    saves = [(f"c{i}", i * 0.5 * HOUR) for i in range(1, 9)]
    kept, preserved, deleted, lp = save_many(
        RetentionPolicy(max_to_keep=2, keep_checkpoint_every_n_hours=1.0), saves, 0.0
    )
    assert paths(kept) == ["c7", "c8"]
    # c2 at 1h (1h after 0), c4 at 2h, c6 at 3h: each exactly n hours after the previous.
    assert paths(preserved) == ["c2", "c4", "c6"]
    assert paths(deleted) == ["c1", "c3", "c5"]
    assert lp == 3 * HOUR


def test_preservation_threshold_is_inclusive_and_uses_tf_arithmetic() -> None:
    policy = RetentionPolicy(max_to_keep=1, keep_checkpoint_every_n_hours=2.0)
    at = [Tracked("old", 100.0 + 2 * HOUR), Tracked("new", 1e9)]
    assert paths(apply_retention(at, 100.0, policy).preserve) == ["old"]
    just_before = [Tracked("old", 100.0 + 2 * HOUR - 1e-6), Tracked("new", 1e9)]
    assert paths(apply_retention(just_before, 100.0, policy).delete) == ["old"]


def test_threshold_uses_tf_float_arithmetic() -> None:
    """TF tests `timestamp - n*3600 >= last_preserved`. At the threshold that can differ in
    floating point from `timestamp >= last_preserved + n*3600`; we follow TF."""
    lp, n = 1 + 1 / 7, 1 / 3
    ts = lp + n * HOUR
    assert ts >= lp + n * HOUR  # the naive form would preserve
    assert not ts - n * HOUR >= lp  # TF's form does not
    decision = apply_retention([Tracked("x", ts), Tracked("y", 1e9)], lp, RetentionPolicy(1, n))
    assert paths(decision.delete) == ["x"]
    assert decision.preserve == ()


def test_zero_hours_means_no_preservation() -> None:
    tracked = [Tracked("a", 1e9), Tracked("b", 2e9)]
    decision = apply_retention(tracked, 0.0, RetentionPolicy(1, 0.0))
    assert paths(decision.delete) == ["a"]
    assert decision.preserve == ()
    assert decision.last_preserved_timestamp == 0.0


def test_last_preserved_updates_within_one_sweep() -> None:
    # Three excess checkpoints 1h apart, n = 1.5h: only the first and third are preserved.
    tracked = [Tracked(f"c{i}", i * HOUR) for i in range(2, 6)] + [Tracked("new", 99 * HOUR)]
    decision = apply_retention(tracked, 0.0, RetentionPolicy(2, 1.5))
    assert paths(decision.preserve) == ["c2", "c4"]
    assert paths(decision.delete) == ["c3"]
    assert paths(decision.keep) == ["c5", "new"]
    assert decision.last_preserved_timestamp == 4 * HOUR


def test_duplicate_tracked_paths_are_refused() -> None:
    with pytest.raises(ValueError, match="more than once"):
        apply_retention([Tracked("a", 1.0), Tracked("a", 2.0)], 0.0, RetentionPolicy(1))


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_policy_refuses_bad_max_to_keep(bad: object) -> None:
    with pytest.raises(ValueError, match="max_to_keep"):
        RetentionPolicy(max_to_keep=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_policy_refuses_bad_hours(bad: float) -> None:
    with pytest.raises(ValueError, match="keep_checkpoint_every_n_hours"):
        RetentionPolicy(max_to_keep=1, keep_checkpoint_every_n_hours=bad)


# --- record_save ---------------------------------------------------------------------------


def test_record_save_appends() -> None:
    assert record_save([Tracked("a", 1.0)], "b", 2.0) == [Tracked("a", 1.0), Tracked("b", 2.0)]


def test_record_save_moves_a_resaved_path_to_the_end() -> None:
    before = [Tracked("a", 1.0), Tracked("b", 2.0), Tracked("c", 3.0)]
    after = record_save(before, "a", 4.0)
    assert after == [Tracked("b", 2.0), Tracked("c", 3.0), Tracked("a", 4.0)]
    assert before[0] == Tracked("a", 1.0)  # input untouched
    # ...so a re-saved checkpoint is not the next to go.
    decision = apply_retention(after, 0.0, RetentionPolicy(2))
    assert paths(decision.delete) == ["b"]


# --- starting up ---------------------------------------------------------------------------


def test_start_fresh_sets_clock_back_one_second() -> None:
    assert start_fresh(1000.0) == RecoveredState((), 999.0, ())


def test_recover_uses_last_preserved_for_missing_timestamps() -> None:
    # last_preserved set (e.g. hand-made file) but no timestamps: all get last_preserved,
    # which is not strictly greater than itself, so none is tracked.
    got = recover(["a", "b"], [], 500.0, 1000.0)
    assert got == RecoveredState((), 500.0, ("a", "b"))


def test_recover_drops_checkpoints_not_newer_than_last_preserved() -> None:
    got = recover(["a", "b", "c"], [10.0, 20.0, 30.0], 20.0, 1000.0)
    assert got.tracked == (Tracked("c", 30.0),)
    assert got.forgotten == ("a", "b")


def test_recover_caps_future_timestamps_at_now() -> None:
    got = recover(["a", "b"], [10.0, 5000.0], 1.0, 1000.0)
    assert got.tracked == (Tracked("a", 10.0), Tracked("b", 1000.0))


def test_recover_after_clock_went_backwards_forgets_everything() -> None:
    # now < last_preserved: last_preserved becomes now and every timestamp is capped at now,
    # so none is strictly newer: nothing can be deleted by mistake.
    got = recover(["a", "b"], [2000.0, 3000.0], 1500.0, 1000.0)
    assert got == RecoveredState((), 1000.0, ("a", "b"))


def test_recover_duplicate_path_keeps_first_position_and_later_time() -> None:
    got = recover(["a", "b", "a"], [10.0, 20.0, 30.0], 0.0, 1000.0)
    assert got.tracked == (Tracked("a", 30.0), Tracked("b", 20.0))
    assert got.forgotten == ()


def test_recover_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="timestamps"):
        recover(["a", "b"], [1.0], 0.0, 10.0)


# --- properties ----------------------------------------------------------------------------

times = st.floats(min_value=-1e10, max_value=1e10, allow_nan=False)
policies = st.builds(
    RetentionPolicy,
    st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=48.0)),
)


@st.composite
def tracked_lists(draw: st.DrawFn) -> list[Tracked]:
    names = draw(st.lists(st.text(min_size=1, max_size=4), unique=True, max_size=12))
    stamps = sorted(draw(st.lists(times, min_size=len(names), max_size=len(names))))
    return [Tracked(n, t) for n, t in zip(names, stamps, strict=True)]


@settings(max_examples=200, deadline=None)
@given(tracked_lists(), times, policies)
def test_sweep_invariants(tracked: list[Tracked], lp: float, policy: RetentionPolicy) -> None:
    d = apply_retention(tracked, lp, policy)
    if policy.max_to_keep is None:
        assert d.keep == tuple(tracked)
    else:
        assert len(d.keep) == min(len(tracked), policy.max_to_keep)
    # Every input checkpoint lands in exactly one bucket, and nothing else does.
    buckets = [*d.keep, *d.preserve, *d.delete]
    assert sorted(buckets, key=tracked.index) == tracked
    assert len(buckets) == len(tracked)
    assert not set(d.keep) & set(d.delete)
    # Order is preserved: kept ones are the newest suffix; each bucket is oldest first.
    assert list(d.keep) == tracked[len(tracked) - len(d.keep) :]
    for bucket in (d.preserve, d.delete):
        assert sorted(bucket, key=tracked.index) == list(bucket)
    if not policy.keep_checkpoint_every_n_hours:
        assert d.preserve == ()
        assert d.last_preserved_timestamp == lp
    # Preserved checkpoints are n hours apart, starting n hours after lp.
    n = policy.keep_checkpoint_every_n_hours or 0.0
    previous = lp
    for p in d.preserve:
        assert p.timestamp - n * HOUR >= previous
        previous = p.timestamp
    assert d.last_preserved_timestamp == previous


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcdefg"), st.floats(0.0, 10.0)), max_size=30),
    policies,
)
def test_saving_sequence_invariants(
    saves: list[tuple[str, float]], policy: RetentionPolicy
) -> None:
    tracked: list[Tracked] = []
    lp = 0.0
    clock = 0.0
    for name, step in saves:
        clock += step * HOUR
        decision = apply_retention(record_save(tracked, name, clock), lp, policy)
        tracked = list(decision.keep)
        lp = decision.last_preserved_timestamp
        assert tracked[-1] == Tracked(name, clock)  # the newest save is always kept
        assert len({t.path for t in tracked}) == len(tracked)
        if policy.max_to_keep is not None:
            assert len(tracked) <= policy.max_to_keep
        assert [t.timestamp for t in tracked] == sorted(t.timestamp for t in tracked)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=3), max_size=8),
    st.data(),
    times,
    times,
)
def test_recover_invariants(names: list[str], data: st.DataObject, lp: float, now: float) -> None:
    stamps = data.draw(
        st.one_of(st.just([]), st.lists(times, min_size=len(names), max_size=len(names)))
    )
    got = recover(names, stamps, lp, now)
    assert got.last_preserved_timestamp == min(lp, now)
    tracked_paths = [t.path for t in got.tracked]
    assert len(set(tracked_paths)) == len(tracked_paths)
    assert set(tracked_paths) | set(got.forgotten) == set(names)
    assert not set(tracked_paths) & set(got.forgotten)
    for t in got.tracked:
        assert got.last_preserved_timestamp < t.timestamp <= now
    # A tracked path keeps the position of its first adopted entry (TF fills a dict).
    effective = stamps or [got.last_preserved_timestamp] * len(names)
    first_adopted = [
        next(
            i
            for i, (name, ts) in enumerate(zip(names, effective, strict=True))
            if name == path and min(ts, now) > got.last_preserved_timestamp
        )
        for path in tracked_paths
    ]
    assert first_adopted == sorted(first_adopted)

"""The save plan: who writes what, in which file (pure, one process)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt._concurrency import cyclic_gc_paused
from anyckpt.codecs.dtypes import DT_STRING, enum_from_dtype
from anyckpt.distributed import PlanError, even_slice
from anyckpt.distributed.plan import (
    Item,
    Manifest,
    assign,
    make_plan,
    one_file_in_key_order,
    shard_options,
)
from anyckpt.formats.sharded import ShardOptions

F32 = enum_from_dtype(np.dtype(np.float32))
I64 = enum_from_dtype(np.dtype(np.int64))


def whole(name: str, shape: tuple[int, ...], dtype: int = F32) -> Item:
    return Item(name.encode(), None, dtype, shape, 4 * math.prod(shape))


def piece(name: str, shape: tuple[int, ...], extents: tuple[tuple[int, int], ...]) -> Item:
    return Item(name.encode(), extents, F32, shape, 4 * math.prod(n for _, n in extents))


def manifests(*per_rank: list[Item]) -> list[Manifest]:
    return [Manifest("ckpt-1", tuple(sorted(items))) for items in per_rank]


def owner_of(plan: object, unit: tuple[bytes, object]) -> list[int]:
    return [
        rank
        for rank, files in enumerate(plan.shards)  # type: ignore[attr-defined]
        for items in files
        for item in items
        if item.unit == unit
    ]


def test_replicated_tensor_is_written_once_by_the_least_loaded_holder() -> None:
    big, small = whole("big", (100,)), whole("small", (3,))
    plan = make_plan(manifests([big, small], [small], [whole("other", (50,)), small]))
    assert owner_of(plan, small.unit) == [1]  # rank 1 has nothing else to write
    assert owner_of(plan, big.unit) == [0]
    assert plan.num_shards == 3
    assert plan.first_shard == (0, 1, 2)


def test_a_rank_with_nothing_to_write_writes_no_file() -> None:
    shared = whole("w", (8,))
    plan = make_plan(manifests([shared, whole("a", (1,))], [shared]))
    assert owner_of(plan, shared.unit) == [1]  # rank 0 already writes a: w goes to rank 1
    assert plan.num_shards == 2
    plan = make_plan(manifests([shared], [shared]))
    assert owner_of(plan, shared.unit) == [0]  # tie: the lowest rank
    assert plan.shards[1] == ()
    assert plan.num_shards == 1


def test_empty_checkpoint_has_one_empty_file() -> None:
    plan = make_plan(manifests([], [], []))
    assert plan.num_shards == 1
    assert plan.shards[0] == ((),)


def test_pieces_tile_and_become_a_partitioned_entry() -> None:
    plan = make_plan(
        manifests(
            [piece("w", (4, 2), ((0, 2), (0, 2)))],
            [piece("w", (4, 2), ((2, 2), (0, 2)))],
        )
    )
    holder = plan.holders[b"w"]
    assert holder.shape == (4, 2)
    assert holder.slices == (((0, 2), (0, 2)), ((2, 2), (0, 2)))
    assert owner_of(plan, (b"w", ((2, 2), (0, 2)))) == [1]
    assert all(item.data_key[:1] == b"\0" for f in plan.shards[0] for item in f)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (((1, 3), (0, 2)), "overlap"),  # overlaps rows 1..2
        (((3, 1), (0, 2)), "do not cover"),  # leaves row 2 uncovered
    ],
)
def test_pieces_that_overlap_or_leave_gaps_are_refused(
    second: tuple[tuple[int, int], ...], message: str
) -> None:
    with pytest.raises(PlanError, match=message):
        make_plan(manifests([piece("w", (4, 2), ((0, 2), (0, 2)))], [piece("w", (4, 2), second)]))


def test_same_name_with_another_shape_or_dtype_is_refused() -> None:
    with pytest.raises(PlanError, match="differs between ranks"):
        make_plan(manifests([whole("b", (3,))], [whole("b", (4,))]))
    with pytest.raises(PlanError, match="differs between ranks"):
        make_plan(manifests([whole("b", (3,))], [whole("b", (3,), I64)]))
    with pytest.raises(PlanError, match="whole on some ranks and sharded on others"):
        make_plan(manifests([whole("w", (4, 2))], [piece("w", (4, 2), ((0, 4), (0, 2)))]))


def test_strings_replicated_with_different_sizes_are_still_one_tensor() -> None:
    a = Item(b"s", None, DT_STRING, (2,), 10)
    b = Item(b"s", None, DT_STRING, (2,), 12)
    plan = make_plan(manifests([a], [b]))
    assert sum(len(items) for files in plan.shards for items in files) == 1


def test_per_rank_sharding_options() -> None:
    items = [whole(f"t{i}", (10,)) for i in range(5)]  # 40 bytes each
    plan = make_plan(manifests(items, [whole("x", (1,))]), shard_options({"num_shards": 2}))
    assert [len(files) for files in plan.shards] == [2, 1]
    assert plan.num_shards == 3
    plan = make_plan(manifests(items, []), shard_options({"max_shard_bytes": 80}))
    assert [len(f) for f in plan.shards[0]] == [2, 2, 1]
    for bad in ({"devices": {"a": "/cpu:0"}}, {"shard_of": lambda k: 0}):
        with pytest.raises(ValueError, match="not supported"):
            shard_options(bad)
    with pytest.raises(ValueError, match="cannot be combined"):
        shard_options({"num_shards": 2, "max_shard_bytes": 10})


@st.composite
def jobs(draw: st.DrawFn) -> list[Manifest]:
    """Random ranks holding random whole tensors (some replicated) and row-sharded ones."""
    world = draw(st.integers(1, 5))
    per_rank: list[list[Item]] = [[] for _ in range(world)]
    for t in range(draw(st.integers(0, 6))):
        size = draw(st.integers(0, 50))
        holders = draw(st.sets(st.integers(0, world - 1), min_size=1))
        for rank in holders:
            per_rank[rank].append(whole(f"whole{t}", (size,)))
    for t in range(draw(st.integers(0, 3))):
        rows = draw(st.integers(1, 12))
        parts = draw(st.integers(1, rows))
        for p in range(parts):
            rs = even_slice(rows, p, parts)
            extents = ((rs.start, rs.stop - rs.start), (0, 3))
            for rank in draw(st.sets(st.integers(0, world - 1), min_size=1)):
                per_rank[rank].append(piece(f"sharded{t}", (rows, 3), extents))
    return manifests(*per_rank)


@settings(max_examples=200, deadline=None)
@given(jobs(), st.sampled_from([None, 1, 2, 3]))
def test_every_unit_is_written_exactly_once_by_a_holder(
    job: list[Manifest], num_shards: int | None
) -> None:
    plan = make_plan(job, ShardOptions(num_shards=num_shards))
    units = {item.unit for m in job for item in m.items}
    writes = [
        (rank, item.unit)
        for rank, files in enumerate(plan.shards)
        for items in files
        for item in items
    ]
    assert sorted(u for _, u in writes) == sorted(units)  # each once, nothing else
    for rank, unit in writes:
        assert any(item.unit == unit for item in job[rank].items)  # by a rank that has it
    # Files are numbered rank by rank, 0..N-1, each file in data-key order.
    assert plan.num_shards == sum(len(files) for files in plan.shards) >= 1
    assert list(plan.first_shard) == [sum(len(f) for f in plan.shards[:r]) for r in range(len(job))]
    for files in plan.shards:
        for items in files:
            keys = [item.data_key for item in items]
            assert keys == sorted(keys)
    assert plan == make_plan(job, ShardOptions(num_shards=num_shards))  # deterministic


@given(st.integers(0, 1000), st.integers(1, 64))
def test_even_slice_splits_exactly(length: int, world: int) -> None:
    parts = [even_slice(length, r, world) for r in range(world)]
    assert parts[0].start == 0
    assert parts[-1].stop == length
    assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    assert parts == [
        slice(int(c[0]), int(c[-1]) + 1) if len(c) else parts[i]
        for i, c in enumerate(np.array_split(np.arange(length), world))
    ]


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(1, 6),
    rows=st.integers(1, 9),
    replicated=st.integers(0, 3),
    num_shards=st.sampled_from([None, 1, 2, 3]),
)
def test_each_ranks_assignment_is_its_share_of_the_plan(
    world: int, rows: int, replicated: int, num_shards: int | None
) -> None:
    """What the primary sends a rank rebuilds, from the rank's own manifest, exactly the data
    files the plan gives it, and is no bigger than the rank's share."""
    per_rank: list[list[Item]] = [[] for _ in range(world)]
    for t in range(3):
        shape = (rows * world, 2)
        for rank in range(world):
            part = even_slice(shape[0], rank, world)
            extents = ((part.start, part.stop - part.start), (0, 2))
            per_rank[rank].append(piece(f"sharded/{t}", shape, extents))
    for t in range(replicated):
        for rank in range(world):
            per_rank[rank].append(whole(f"replica/{t}", (t + 1,)))
    ms = manifests(*per_rank)
    plan = make_plan(ms, ShardOptions(num_shards=num_shards))
    assignments = assign(plan, ms)
    assert len(assignments) == world
    for rank, (assignment, manifest) in enumerate(zip(assignments, ms, strict=True)):
        assert assignment.num_shards == plan.num_shards
        assert assignment.files_of(manifest.items) == plan.files_of(rank)
        assert sum(len(f) for f in assignment.files) <= len(manifest.items)


def _overlaps(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> bool:
    return all(max(s, t) < min(s + m, t + n) for (s, m), (t, n) in zip(a, b, strict=True))


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    data=st.data(),
)
def test_check_tiling_finds_an_overlap_exactly_when_a_pair_overlaps(
    shape: tuple[int, ...], data: st.DataObject
) -> None:
    """The sorted one-axis check and the pairwise fallback agree with comparing every pair."""
    from anyckpt.partitioned import check_tiling

    axis = data.draw(st.integers(0, len(shape) - 1))
    one_axis = data.draw(st.booleans())

    def extent(dim: int, varies: bool) -> tuple[int, int]:
        if not varies:
            return (0, dim)
        start = data.draw(st.integers(0, dim - 1))
        return (start, data.draw(st.integers(1, dim - start)))

    parts = [
        tuple(extent(dim, not one_axis or i == axis) for i, dim in enumerate(shape))
        for _ in range(data.draw(st.integers(1, 6)))
    ]
    expected = any(_overlaps(a, b) for i, a in enumerate(parts) for b in parts[:i])
    try:
        check_tiling(shape, parts)
        raised = None
    except ValueError as exc:
        raised = str(exc)
    if expected:
        assert raised is not None
        assert "overlap" in raised
    else:
        assert raised is None or "overlap" not in raised


def test_check_tiling_of_8192_row_pieces() -> None:
    """8,192 row pieces (a tensor over 8,192 ranks) are checked, and one overlap is found."""
    from anyckpt.partitioned import check_tiling

    rows = [((r, 1), (0, 4)) for r in range(8192)]
    check_tiling((8192, 4), rows)
    bad = [*rows[:-1], ((8190, 2), (0, 4))]
    with pytest.raises(ValueError, match=r"\(\(8190, 2\), \(0, 4\)\)"):
        check_tiling((8192, 4), bad)


_names = st.binary(min_size=1, max_size=6)
_extents = st.lists(
    st.tuples(st.integers(0, 300), st.integers(1, 300)), min_size=1, max_size=3
).map(tuple)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(_names, st.none() | _extents),
        min_size=1,
        max_size=30,
        unique_by=lambda unit: (unit[0], unit[1] is None),
    )
)
def test_a_files_items_sort_as_their_data_keys(units: list[tuple[bytes, object]]) -> None:
    """The plan orders a data file without encoding its keys: the same order as the keys,
    whole names starting with a zero byte included."""
    items = [
        Item(name, extents, F32, (1,) * (len(extents) if extents else 1), 4)  # type: ignore[arg-type]
        for name, extents in units
    ]
    (ordered,) = one_file_in_key_order(items)
    keys = [item.data_key for item in ordered]
    assert keys == sorted(keys)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (None, None),
        ((40, (39, 2)), "overlap"),  # piece 40 reaches into piece 41
        ((40, (41, 1)), "do not cover"),  # a replica of piece 41: row 40 is left uncovered
        ((99, (99, 2)), "outside"),
        ((0, (0, 2)), "overlap"),
    ],
)
def test_many_pieces_are_checked_exactly(
    change: tuple[int, tuple[int, int]] | None, message: str | None
) -> None:
    """Past 64 pieces the tiling is checked with NumPy; it refuses what the exact check does."""
    pieces = [((row, 1), (0, 3)) for row in range(100)]
    if change is not None:
        at, rows = change
        pieces[at] = (rows, (0, 3))
    per_rank = [[piece("w", (100, 3), extents)] for extents in pieces]
    if message is None:
        plan = make_plan(manifests(*per_rank))
        assert plan.holders[b"w"].slices == tuple(sorted(pieces))
    else:
        with pytest.raises(PlanError, match=message):
            make_plan(manifests(*per_rank))


def test_planning_pauses_the_cyclic_collector_and_restores_it() -> None:
    import gc

    seen: list[bool] = []
    with cyclic_gc_paused():
        seen.append(gc.isenabled())
        with cyclic_gc_paused():
            seen.append(gc.isenabled())
        seen.append(gc.isenabled())
    assert seen == [False, False, False]
    assert gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()

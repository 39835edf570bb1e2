"""Sharded saves: the planner (by device, by size, balanced, explicit), V2 and V1 sharded round
trips, the v2_sharded fixture re-saved byte for byte, crash safety, and the manager."""

from __future__ import annotations

import filecmp
import itertools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
import anyckpt.sync
from anyckpt.codecs.bundle import decode_entry
from anyckpt.codecs.table import read_table
from anyckpt.formats.sharded import ShardOptions, plan_shards, tensor_nbytes
from anyckpt.partitioned import Partitioned
from anyckpt.storage import Storage

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == object or b.dtype == object:
        return a.shape == b.shape and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- the planner --------------------------------------------------------------------------

SIZES = st.lists(st.integers(0, 5000), min_size=0, max_size=30)


def keyed(sizes: list[int]) -> list[tuple[str, int]]:
    return [(f"k{i:03d}", s) for i, s in enumerate(sizes)]


@settings(max_examples=200, deadline=None)
@given(sizes=SIZES, limit=st.integers(1, 8000))
def test_max_shard_bytes_keeps_order_and_limit(sizes: list[int], limit: int) -> None:
    items = keyed(sizes)
    shards = plan_shards(items, ShardOptions(max_shard_bytes=limit))
    assert [k for shard in shards for k in shard] == [k for k, _ in items]  # order, no loss
    size = dict(items)
    for shard in shards:
        total = sum(size[k] for k in shard)
        # Only a lone big tensor (plus any empty ones before it) exceeds the limit.
        assert total <= limit or len([k for k in shard if size[k]]) == 1
    assert all(shards) or shards == [[]]
    # Greedy: a shard closes only when the next tensor would not fit.
    for a, b in itertools.pairwise(shards):
        assert sum(size[k] for k in a) + size[b[0]] > limit


@settings(max_examples=200, deadline=None)
@given(sizes=SIZES, count=st.integers(1, 8))
def test_num_shards_balances(sizes: list[int], count: int) -> None:
    items = keyed(sizes)
    shards = plan_shards(items, ShardOptions(num_shards=count))
    assert sorted(k for shard in shards for k in shard) == [k for k, _ in items]
    assert len(shards) == max(1, min(count, len(items)))
    size = dict(items)
    loads = [sum(size[k] for k in shard) for shard in shards]
    if items:
        # Largest-first greedy: no shard exceeds the average by more than the biggest tensor.
        assert max(loads) <= sum(sizes) / len(shards) + max(sizes)
    for shard in shards:
        assert shard == sorted(shard)


@settings(max_examples=100, deadline=None)
@given(
    devices=st.lists(st.sampled_from(["/gpu:0", "/gpu:1", "/cpu:0", None]), max_size=20),
    limit=st.none() | st.integers(1, 100),
)
def test_devices_group_in_device_name_order(devices: list[str | None], limit: int | None) -> None:
    items = keyed([10] * len(devices))
    by_key = {k: d for (k, _), d in zip(items, devices, strict=True)}
    shards = plan_shards(items, ShardOptions(devices=by_key, max_shard_bytes=limit))
    flat_devices = [by_key[k] or "" for shard in shards for k in shard]
    assert flat_devices == sorted(flat_devices)  # groups ordered by device name
    for shard in shards:
        assert len({by_key[k] or "" for k in shard}) <= 1  # one device per shard
    assert sorted(k for shard in shards for k in shard) == sorted(by_key)


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        ShardOptions.from_options({"max_shard_bytes": 0})
    with pytest.raises(ValueError, match="positive"):
        ShardOptions.from_options({"num_shards": True})
    with pytest.raises(ValueError, match="cannot be combined"):
        ShardOptions.from_options({"shard_of": len, "devices": {}})
    with pytest.raises(ValueError, match="cannot be combined"):
        ShardOptions.from_options({"num_shards": 2, "devices": {}})
    with pytest.raises(TypeError, match="devices"):
        ShardOptions.from_options({"devices": "/gpu:0"})
    assert not ShardOptions.from_options({"unrelated": 1}).sharded
    with pytest.raises(TypeError, match="must be a str"):
        plan_shards([("a", 1)], ShardOptions(devices=lambda k: 0))  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        plan_shards([("a", 1)], ShardOptions(shard_of=lambda k: -1))
    assert plan_shards([("a", 1), ("b", 1)], ShardOptions(shard_of=lambda k: 2 * (k == "b"))) == [
        ["a"],
        [],
        ["b"],
    ]


def test_tensor_nbytes() -> None:
    assert tensor_nbytes(np.zeros((3, 4), np.float32)) == 48
    strings = np.empty(2, dtype=object)
    strings[:] = [b"abc", b""]
    assert tensor_nbytes(strings) == 5


# -- V2 sharded ---------------------------------------------------------------------------


def test_v2_sharded_fixture_resaves_byte_for_byte(tmp_path: Path) -> None:
    case = FIXTURES / "v2_sharded"
    index = read_table((case / "model.ckpt-3.index").read_bytes())
    shard = {k.decode(): decode_entry(v).shard_id for k, v in index[1:]}
    tensors = anyckpt.sync.load(case / "model.ckpt-3")
    written = anyckpt.sync.save(
        tmp_path / "model.ckpt-3",
        tensors,
        options={
            "devices": {
                k: f"/job:localhost/replica:0/task:0/device:CPU:{shard[k]}" for k in tensors
            }
        },
    )
    for path in written:
        assert filecmp.cmp(path, case / os.path.basename(path), shallow=False), path


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["v1", "v2"])
async def test_sharded_round_trip_with_partitions(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(1)
    tensors: dict[str, np.ndarray] = {
        f"layer{i}/w": rng.standard_normal((64, 16)).astype(np.float32) for i in range(8)
    }
    tensors["emb"] = Partitioned.split(rng.integers(0, 1000, (30, 4)), 3)
    tensors["names"] = np.array([b"a", b"bcd"], dtype=object)
    options = {
        "devices": lambda k: "/gpu:1" if k.startswith("layer") else "/cpu:0",
        "max_shard_bytes": 10_000,
    }
    written = await anyckpt.save(tmp_path / "c", tensors, format=fmt, options=options)
    assert len(written) >= 5
    loaded = await anyckpt.load(tmp_path / "c")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert same(loaded[key], value), key
    async with anyckpt.open(tmp_path / "c") as reader:
        assert len(reader.spec("emb").partitions) == 3
        assert same(await reader.read("emb", (slice(5, 25),)), np.asarray(tensors["emb"])[5:25])


class _Boom(Exception):
    pass


class _Watched:
    """A FileWriter proxy: counts writers open at once; commits slowly; may fail its path."""

    active = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, inner: Any, fail: bool) -> None:
        self._inner = inner
        self._fail = fail
        with self.lock:
            _Watched.active += 1
            _Watched.peak = max(_Watched.peak, _Watched.active)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _done(self) -> None:
        with self.lock:
            _Watched.active -= 1

    def commit(self) -> None:
        time.sleep(0.05)
        if self._fail:
            raise _Boom
        self._inner.commit()
        self._done()

    def abort(self) -> None:
        self._inner.abort()
        self._done()


def watch_writers(monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> None:
    original = Storage.open_writer
    _Watched.active = _Watched.peak = 0

    def open_writer(self: Storage, path: str, *, durable: bool = True) -> Any:
        return _Watched(original(self, path, durable=durable), fail is not None and fail in path)

    monkeypatch.setattr(Storage, "open_writer", open_writer)


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["v1", "v2"])
async def test_a_failing_shard_leaves_nothing(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One shard fails while the others succeed: no file of the save remains (for V2 no
    index, for V1 no shard), so nothing half-written looks like a checkpoint."""
    watch_writers(monkeypatch, fail="00002-of-00004")
    tensors = {k: np.zeros(1 << 14, np.float32) for k in "abcd"}
    try:
        await anyckpt.save(
            tmp_path / "c", tensors, format=fmt, options={"num_shards": 4}, durable=False
        )
    except BaseException as exc:
        assert _boom_in(exc), exc  # noqa: PT017
    else:
        pytest.fail("the save did not fail")
    assert os.listdir(tmp_path) == []


def _boom_in(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_boom_in(e) for e in exc.exceptions)
    return isinstance(exc, _Boom)


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["v1", "v2"])
async def test_shards_are_written_concurrently(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch_writers(monkeypatch)
    tensors = {f"t{i}": np.full(1000, i, np.float32) for i in range(4)}
    await anyckpt.save(tmp_path / "c", tensors, format=fmt, options={"num_shards": 4})
    assert _Watched.peak >= 3  # several shard files in flight at once
    assert same(anyckpt.sync.load(tmp_path / "c")["t3"], tensors["t3"])


@pytest.mark.anyio
async def test_manager_v2_with_devices(tmp_path: Path) -> None:
    async with anyckpt.CheckpointManager(
        tmp_path,
        max_to_keep=1,
        durable=False,
        format_options={"devices": {"a": "/gpu:0", "b": "/gpu:1"}},
    ) as manager:
        for step in (1, 2):
            await (await manager.save({"a": np.ones(3) * step, "b": np.zeros(2)}, step))
        restored = await manager.restore()
    assert same(restored["a"], np.ones(3) * 2)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint",
        "ckpt-2.data-00000-of-00002",
        "ckpt-2.data-00001-of-00002",
        "ckpt-2.index",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["v1", "v2"])
async def test_manager_keeps_partitions_through_capture(tmp_path: Path, fmt: str) -> None:
    emb = Partitioned.split(np.arange(40.0).reshape(10, 4), 3)
    async with anyckpt.CheckpointManager(tmp_path, format=fmt, durable=False) as manager:
        await (await manager.save({"emb": emb}, step=1))  # copied (captured) before writing
    async with anyckpt.open(tmp_path / "ckpt-1") as reader:
        assert [p.extents for p in reader.spec("emb").partitions] == list(emb.partitions)
        assert same(await reader.read("emb"), np.asarray(emb))

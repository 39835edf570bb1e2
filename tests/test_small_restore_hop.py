"""A restore of a few keys (``anyckpt.load(prefix, keys)``, ``reader.read_many(keys)``) is
looked up and read in one worker hop (``V2Reader.read_small_now``): the same arrays and errors
as the general path, the index lookups off the event loop, and the general path taken for
what one hop should not do (partitioned tensors, large reads, remote storage, many keys)."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import numpy as np
import pytest

import anyckpt
from anyckpt.formats.v2_reader import NOW_KEYS, SMALL_READ_BYTES, V2Reader
from anyckpt.partitioned import Partitioned

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    state: dict[str, np.ndarray] = {
        f"layer_{i:03d}/w": rng.standard_normal((3, i % 5 + 1)).astype(np.float32)
        for i in range(200)
    }
    state["strings"] = np.array([b"x", b"", b"yz"], dtype=object)
    state["empty"] = np.zeros((0, 2), np.int32)
    state["scalar"] = np.array(7, np.int64)
    state["part"] = Partitioned.split(np.arange(12.0).reshape(6, 2), 3)
    return state


def _equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], keys: list[str]) -> None:
    assert list(got) == keys
    for key in keys:
        assert got[key].dtype == np.asarray(want[key]).dtype
        np.testing.assert_array_equal(got[key], np.asarray(want[key]))


@pytest.mark.parametrize("shards", [1, 3])
async def test_few_keys_read_in_one_hop_equal_the_saved_ones(tmp_path: Path, shards: int) -> None:
    state = _state()
    prefix = tmp_path / "ckpt"
    options = {"num_shards": shards} if shards > 1 else None
    await anyckpt.save(prefix, state, options=options)
    keys = ["layer_150/w", "strings", "layer_002/w", "empty", "scalar", "layer_150/w"]
    got = await anyckpt.load(prefix, keys)
    _equal(got, state, ["layer_150/w", "strings", "layer_002/w", "empty", "scalar"])
    async with anyckpt.open(prefix) as reader:
        assert isinstance(reader, V2Reader)
        assert reader.read_small_now(["scalar", "strings"], True) is not None
        _equal(await reader.read_many(keys[:3]), state, keys[:3])


async def test_partitioned_and_large_reads_take_the_general_path(tmp_path: Path) -> None:
    state = _state()
    state["large"] = np.ones(SMALL_READ_BYTES // 4 + 1, np.float32)
    prefix = tmp_path / "ckpt"
    await anyckpt.save(prefix, state)
    async with anyckpt.open(prefix) as reader:
        assert isinstance(reader, V2Reader)
        assert reader.read_small_now(["scalar", "part"], True) is None
        assert reader.read_small_now(["large"], True) is None
    for keys in (["scalar", "part"], ["large", "layer_001/w"]):
        _equal(await anyckpt.load(prefix, keys), state, keys)


async def test_a_missing_key_raises_key_error(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    await anyckpt.save(prefix, _state())
    with pytest.raises(KeyError, match="nope"):
        await anyckpt.load(prefix, ["scalar", "nope"])
    with pytest.raises(KeyError, match="nope"):
        await anyckpt.load(prefix, ["nope"] * (NOW_KEYS + 1))


async def test_a_corrupt_tensor_is_reported_by_the_one_hop_read(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt"
    state = {"a": np.arange(64, dtype=np.float32), "b": np.ones(8, np.float32)}
    await anyckpt.save(prefix, state)
    async with anyckpt.open(prefix) as reader:
        assert isinstance(reader, V2Reader)
        offset = reader._entry("a").offset
    data = tmp_path / "ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[offset + 5] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(anyckpt.CorruptCheckpointError, match="checksum") as info:
        await anyckpt.load(prefix, ["a"])
    assert "ckpt.data-00000-of-00001" in str(info.value)
    unchecked = await anyckpt.load(prefix, ["a"], verify=False)
    assert unchecked["a"].tobytes() != state["a"].tobytes()
    _equal(await anyckpt.load(prefix, ["b"]), state, ["b"])


async def test_lookups_run_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "ckpt"
    state = _state()
    await anyckpt.save(prefix, state)
    threads: set[int] = set()
    original = V2Reader._find

    def spy(self: V2Reader, key: str) -> object:
        threads.add(threading.get_ident())
        return original(self, key)

    monkeypatch.setattr(V2Reader, "_find", spy)
    many = [f"layer_{i:03d}/w" for i in range(200)] * (NOW_KEYS // 200 + 1)  # > NOW_KEYS
    for keys in (["layer_003/w", "scalar"], many):
        threads.clear()
        async with anyckpt.open(prefix) as reader:
            _equal(await reader.read_many(keys), state, list(dict.fromkeys(keys)))
        assert threads
        assert threading.get_ident() not in threads
        threads.clear()
        _equal(await anyckpt.load(prefix, keys), state, list(dict.fromkeys(keys)))
        assert threads
        assert threading.get_ident() not in threads


async def test_memory_storage_reads_the_same() -> None:
    """fsspec's memory filesystem has no cheap small reads: the lookups are done in the hop,
    the read as before."""
    state = _state()
    prefix = f"memory://small-hop-{threading.get_ident()}-{id(state)}/ckpt"
    await anyckpt.save(prefix, state)
    keys = ["layer_010/w", "strings", "part"]
    _equal(await anyckpt.load(prefix, keys), state, keys)


async def test_v1_checkpoints_are_opened_after_the_probe(tmp_path: Path) -> None:
    state = {k: v for k, v in _state().items() if k != "part"}
    prefix = tmp_path / "model.ckpt-1"
    await anyckpt.save(prefix, state, format="v1")
    _equal(await anyckpt.load(prefix, ["scalar", "strings"]), state, ["scalar", "strings"])


class TestSyncLoad:
    """``anyckpt.sync.load(prefix, keys)`` reads a few keys on the calling thread."""

    def test_reads_on_the_calling_thread(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        state = _state()
        prefix = tmp_path / "ckpt"
        anyckpt.sync.save(prefix, state)
        threads: set[int] = set()
        original = V2Reader._read_shard

        def spy(self: V2Reader, *args: object) -> object:
            threads.add(threading.get_ident())
            return original(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(V2Reader, "_read_shard", spy)
        keys = ["scalar", "layer_007/w", "strings"]
        _equal(anyckpt.sync.load(prefix, keys), state, keys)
        assert threads == {threading.get_ident()}

    def test_the_general_path_finishes_what_one_thread_should_not(self, tmp_path: Path) -> None:
        state = _state()
        v2, v1 = tmp_path / "v2", tmp_path / "v1"
        anyckpt.sync.save(v2, state)
        anyckpt.sync.save(v1, {k: v for k, v in state.items() if k != "part"}, format="v1")
        _equal(anyckpt.sync.load(v2, ["part", "scalar"]), state, ["part", "scalar"])
        _equal(anyckpt.sync.load(v1, ["strings"]), state, ["strings"])
        _equal(anyckpt.sync.load(v2, ["empty"], verify=False), state, ["empty"])
        with pytest.raises(KeyError, match="absent"):
            anyckpt.sync.load(v2, ["absent"])
        with pytest.raises(ValueError, match="layout"):
            anyckpt.sync.load(v2, ["scalar"], layout="tree")

    def test_inside_an_event_loop_it_reads_through_a_portal(self, tmp_path: Path) -> None:
        state = _state()
        prefix = tmp_path / "ckpt"
        anyckpt.sync.save(prefix, state)

        async def in_loop() -> dict[str, np.ndarray]:
            return anyckpt.sync.load(prefix, ["scalar"])

        _equal(anyio.run(in_loop), state, ["scalar"])

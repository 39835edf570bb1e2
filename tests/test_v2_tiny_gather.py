"""V2 saves of tiny tensors, gathered a window at a time (formats.v2_data.TINY_BELOW,
TINY_WINDOW) and checksummed row by row: the same files as writing each tensor on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import fsspec
import ml_dtypes
import numpy as np
import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.codecs.bundle import decode_entry
from anyckpt.codecs.crc import masked_crc32c
from anyckpt.codecs.table import read_table
from anyckpt.formats import v2_data
from anyckpt.tensors import key_to_bytes


def _save(prefix: Path, state: dict[str, Any], **options: Any) -> list[Path]:
    files = anyio.run(
        lambda: anyckpt.save(str(prefix), state, durable=False, options=options or None)
    )
    return sorted(Path(f) for f in files)


def _same_as_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: dict[str, Any], **options: Any
) -> None:
    """The save's files equal those written with no tensor counted as tiny."""
    gathered = _save(tmp_path / "gathered" / "c", state, **options)
    with monkeypatch.context() as patch:
        patch.setattr(v2_data, "TINY_BELOW", 0)
        patch.setattr(v2_data, "SMALL_BELOW", 0)
        alone = _save(tmp_path / "alone" / "c", state, **options)
    assert [p.name for p in gathered] == [p.name for p in alone]
    for a, b in zip(gathered, alone, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    loaded = anyio.run(anyckpt.load, str(tmp_path / "gathered" / "c"))
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        got = loaded[key]
        if np.asarray(value).dtype == object:
            assert got.tolist() == np.asarray(value).tolist()
        else:
            expected = np.asarray(value).dtype
            assert got.dtype in (expected, expected.newbyteorder("<"))
            np.testing.assert_array_equal(got, value)


def _entries(index: Path) -> dict[bytes, Any]:
    return {k: decode_entry(v) for k, v in read_table(index.read_bytes()) if k}


@pytest.mark.parametrize("count", [1, 4095, 4096, 4097, 8193])
def test_window_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    rng = np.random.default_rng(count)
    state = {f"w/{i:05d}": rng.standard_normal(1 + i % 5).astype(np.float32) for i in range(count)}
    _same_as_one_by_one(tmp_path, monkeypatch, state)
    data = (tmp_path / "gathered" / "c.data-00000-of-00001").read_bytes()
    assert data == b"".join(state[k].tobytes() for k in sorted(state))
    entries = _entries(tmp_path / "gathered" / "c.index")
    for key, array in state.items():
        entry = entries[key_to_bytes(key)]
        assert entry.crc32c == masked_crc32c(array.tobytes())


def _mixed_state(count: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    dtypes = [np.float32, np.int8, np.bool_, np.float64, np.int64, np.uint16, np.complex64]
    state: dict[str, Any] = {}
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        match i % 13:
            case 0:
                value: Any = rng.standard_normal(300).astype(np.float32)  # not tiny
            case 1:
                value = np.array([b"", b"abc", "ünï".encode()], dtype=object)
            case 2:
                value = np.zeros((0, 3), dtype)
            case 3:
                value = rng.standard_normal((4, 6))[:, ::2]  # tiny, not contiguous
            case 4:
                value = np.array(7, dtype)  # 0-d
            case 5:
                value = rng.integers(-50, 50, 5).astype(">i4")  # big-endian
            case 6:
                value = rng.standard_normal(3).astype(ml_dtypes.bfloat16)
            case 7:
                value = np.arange(16, dtype=np.uint8)[::-1]  # negative strides
            case 8:
                value = rng.standard_normal(16).astype(np.float32)  # exactly 64 bytes
            case 9:
                value = rng.standard_normal(15).astype(np.float32)  # 60 bytes: tiny
            case _:
                value = (rng.standard_normal(1 + i % 7) * 9).astype(dtype)
        state[f"m/{i:05d}{'x' * (i % 4)}"] = value
    return state


def test_tiny_mixed_with_large_strings_and_odd_arrays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _same_as_one_by_one(tmp_path, monkeypatch, _mixed_state(9000))


def test_tiny_runs_of_alternating_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {
        f"a{i:05d}": np.full(1 + i % 3, i, np.int16 if i % 2 else np.float64) for i in range(5000)
    }
    _same_as_one_by_one(tmp_path, monkeypatch, state)


def test_tiny_only_zero_size_and_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"z{i}": np.zeros(0, np.float32) for i in range(10)}
    _same_as_one_by_one(tmp_path, monkeypatch, state)
    state = {f"s{i}": np.float64(i) * np.ones((), np.float64) for i in range(5000)}
    _same_as_one_by_one(tmp_path, monkeypatch, state)


@pytest.mark.parametrize(
    "options", [{"num_shards": 3}, {"max_shard_bytes": 2048}, {"data_order": "given"}]
)
def test_sharded_and_given_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    state = _mixed_state(3000)
    if "data_order" in options:  # a plain state, one file in the given order
        state = {k: v for k, v in reversed(state.items()) if np.asarray(v).dtype != object}
    _same_as_one_by_one(tmp_path, monkeypatch, state, **options)


def test_memory_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store without writev (fsspec): tiny windows are written as one buffer each."""
    state = _mixed_state(5000)
    anyio.run(lambda: anyckpt.save("memory://tiny/a", state))
    with monkeypatch.context() as patch:
        patch.setattr(v2_data, "TINY_BELOW", 0)
        patch.setattr(v2_data, "SMALL_BELOW", 0)
        anyio.run(lambda: anyckpt.save("memory://tiny/b", state))
    fs = fsspec.filesystem("memory")
    for suffix in (".index", ".data-00000-of-00001"):
        assert fs.cat(f"/tiny/a{suffix}") == fs.cat(f"/tiny/b{suffix}")


# -- small tensors (below SMALL_BELOW) gathered in a file of many tensors ---------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=60))
def test_window_crcs_equal_each_tensors_crc(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    gathered = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    got = v2_data._window_crcs(gathered, np.array(sizes, dtype=np.uint32))
    assert got.tolist() == [crc32c(p.tobytes()) for p in pieces]


@pytest.mark.parametrize("count", [1, 4095, 4097])
def test_small_tensors_gathered_in_a_file_of_many_write_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """With MANY_TENSORS lowered, a file of 1 KiB (and mixed) tensors takes the gathered path:
    the same files as each tensor checksummed and written in place."""
    rng = np.random.default_rng(count)
    state: dict[str, Any] = {
        f"t{i:05d}": rng.standard_normal(i % 1100 + 1).astype(np.float32) for i in range(count)
    }
    state["odd"] = rng.standard_normal((30, 30)).astype(np.float32)[::3, ::2]  # not contiguous
    state["bool"] = np.ones(3000, bool)
    monkeypatch.setattr(v2_data, "MANY_TENSORS", 0)
    _same_as_one_by_one(tmp_path / "only", monkeypatch, state)
    state["big"] = np.ones(1 << 19, np.float32)  # and a file that is not all gathered
    state["s"] = np.array([b"ab", b""], dtype=object)
    _same_as_one_by_one(tmp_path / "mixed", monkeypatch, state)
    restored = anyckpt.sync.load(tmp_path / "mixed" / "gathered" / "c")
    for key in ("t00000", "odd", "bool", "big", "s"):
        np.testing.assert_array_equal(restored[key], state[key])

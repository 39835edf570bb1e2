"""The column-wise decoding of a whole V2 index (issue 13, defect 7) against the entry-by-entry
reference: LazyTable.packed (and its pieces) against read_table, decode_columns (and
ColumnsBuilder's pieces) against decode_record, and EntryTable's names and lookups (keys in one
part or many) against decoding each key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt import Partitioned
from anyckpt.codecs import DecodeError
from anyckpt.codecs.bundle import BundleEntry, EntryRecord, decode_record, encode_entry
from anyckpt.codecs.bundle_batch import ColumnsBuilder, decode_columns
from anyckpt.codecs.table import TableBuilder, read_table
from anyckpt.codecs.table_lookup import LazyTable
from anyckpt.formats.base import key_view
from anyckpt.formats.v2_entries import EntryTable, KeyParts
from anyckpt.tensors import key_from_bytes, key_to_bytes

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = st.binary(max_size=12) | st.lists(
    st.sampled_from([0x00, 0x61, 0x62, 0xC3, 0xA9, 0xFF]), max_size=12
).map(bytes)


def _offsets(items: list[bytes]) -> np.ndarray:
    out = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in items], out=out[1:])
    return out


@FAST
@given(
    entries=st.lists(st.tuples(KEYS, st.binary(max_size=20)), unique_by=lambda kv: kv[0]).map(
        sorted
    ),
    block_size=st.sampled_from([1, 16, 256, 256 * 1024]),
)
def test_packed_equals_the_reference_table_reader(
    entries: list[tuple[bytes, bytes]], block_size: int
) -> None:
    builder = TableBuilder(block_size=block_size)
    for key, value in entries:
        builder.add(key, value)
    data = builder.finish()
    packed = LazyTable(data).packed()
    assert [(packed.key(i), packed.value(i)) for i in range(len(packed))] == read_table(data)


@FAST
@given(
    entries=st.lists(st.tuples(KEYS, st.binary(max_size=20)), unique_by=lambda kv: kv[0]).map(
        sorted
    ),
    block_size=st.sampled_from([1, 16, 256]),
    min_entries=st.sampled_from([-1, 0, 1, 2, 5, 1 << 14]),
)
def test_packed_pieces_join_to_the_reference_table(
    entries: list[tuple[bytes, bytes]], block_size: int, min_entries: int
) -> None:
    builder = TableBuilder(block_size=block_size)
    for key, value in entries:
        builder.add(key, value)
    data = builder.finish()
    pieces = list(LazyTable(data).packed_pieces(min_entries=min_entries))
    assert pieces  # at least one, if empty
    if min_entries < 0:
        assert len(pieces) == 1
    for piece in pieces[:-1]:
        assert len(piece) >= max(min_entries, 1)
    for piece in pieces:  # each piece's offsets are its own
        assert piece.key_offsets[0] == 0
        assert piece.value_offsets[0] == 0
        assert piece.key_offsets[-1] == len(piece.keys)
        assert piece.value_offsets[-1] == len(piece.values)
    joined = [(p.key(i), p.value(i)) for p in pieces for i in range(len(p))]
    assert joined == read_table(data)


@FAST
@given(data=st.binary(min_size=48, max_size=600))
def test_packed_on_arbitrary_bytes_agrees_with_the_reference(data: bytes) -> None:
    try:
        expected: list[tuple[bytes, bytes]] | None = read_table(data)
    except DecodeError:
        expected = None
    try:
        table = LazyTable(data)
        packed = table.packed()
    except DecodeError:
        assert expected is None
        return
    assert expected is not None  # packed checks at least what read_table checks
    assert [(packed.key(i), packed.value(i)) for i in range(len(packed))] == expected


ENTRIES = st.builds(
    BundleEntry,
    dtype=st.sampled_from([1, 2, 7, 14, 300]),
    shape=st.lists(st.sampled_from([0, 1, 3, 128, 1 << 20]), max_size=3).map(tuple),
    shard_id=st.sampled_from([0, 1, 1 << 20]),
    offset=st.integers(0, (1 << 63) - 1),
    size=st.integers(0, (1 << 40)),
    crc32c=st.integers(0, (1 << 32) - 1),
    slices=st.sampled_from([(), (((0, -1),),), (((0, 1), (2, -1)),)]),
)
VALUES = st.lists(ENTRIES.map(encode_entry) | st.binary(max_size=30), max_size=40)


def _reference(values: list[bytes]) -> list[EntryRecord] | str:
    """Each value decoded on its own, or the error of the first refused."""
    out: list[EntryRecord] = []
    for value in values:
        try:
            out.append(decode_record(value))
        except DecodeError as exc:  # noqa: PERF203 - the reference, entry by entry
            return str(exc)
    return out


@FAST
@given(values=VALUES, chunk=st.sampled_from([1, 3, 1 << 14]))
def test_decode_columns_equals_decode_record_entry_by_entry(
    values: list[bytes], chunk: int
) -> None:
    expected = _reference(values)
    if isinstance(expected, str):  # the first refused value's own error
        with pytest.raises(DecodeError) as info:
            decode_columns(bytearray(b"".join(values)), _offsets(values), chunk)
        assert str(info.value) == expected
        return
    columns = decode_columns(bytearray(b"".join(values)), _offsets(values), chunk)
    assert columns.records() == expected
    assert [columns.record(i) for i in range(len(values))] == expected
    picked = np.arange(len(values))[::2]
    assert columns.records(picked) == [expected[i] for i in picked.tolist()]


def _split(items: list[bytes], cuts: list[int]) -> list[list[bytes]]:
    """``items`` in consecutive runs ending at ``cuts`` (taken modulo, sorted; may be empty)."""
    ends = sorted({c % (len(items) + 1) for c in cuts} | {len(items)})
    out, start = [], 0
    for end in ends:
        out.append(items[start:end])
        start = end
    return out


@FAST
@given(values=VALUES, cuts=st.lists(st.integers(0, 40), max_size=4))
def test_columns_builder_equals_one_decode_columns(values: list[bytes], cuts: list[int]) -> None:
    expected = _reference(values)
    if isinstance(expected, str):
        return  # refused values: the test above; the builder raises the same error
    builder = ColumnsBuilder()
    for run in _split(values, cuts):
        builder.add(bytearray(b"".join(run)), _offsets(run))
    columns = builder.finish()
    assert len(columns) == len(values)
    assert columns.records() == expected
    whole = decode_columns(bytearray(b"".join(values)), _offsets(values))
    assert columns.head_ids.dtype == whole.head_ids.dtype
    assert columns.shard_ids.dtype == whole.shard_ids.dtype


@FAST
@given(
    keys=st.lists(KEYS, unique=True).map(sorted),
    cuts=st.lists(st.integers(0, 30), max_size=4),
    probes=st.lists(KEYS, max_size=5),
)
def test_entry_table_of_key_parts_answers_as_one_blob(
    keys: list[bytes], cuts: list[int], probes: list[bytes]
) -> None:
    """Keys added a piece at a time (as the reader does: ASCII parts as str until a non-ASCII
    one turns every part to bytes) answer every question as the keys in one blob do."""
    value = encode_entry(BundleEntry(1, (), 0, 0, 4, 7))
    columns = decode_columns(value * len(keys), _offsets([value] * len(keys)))
    parts = KeyParts()
    for run in _split(keys, cuts):
        parts.add(bytearray(b"".join(run)))
    assert parts.is_text == all(k.isascii() for k in keys)
    table = EntryTable(parts, _offsets(keys), columns)
    one = EntryTable(bytearray(b"".join(keys)), _offsets(keys), columns)
    everything = np.arange(len(keys))
    assert table.names(everything) == one.names(everything) == [key_from_bytes(k) for k in keys]
    assert table.names(everything[::-1]) == one.names(everything[::-1])
    assert [table.raw(i) for i in range(len(keys))] == keys
    assert table.starting_with_nul().tolist() == one.starting_with_nul().tolist()
    for probe in [*keys, *probes]:
        assert table.position(probe) == one.position(probe)
        name = key_from_bytes(probe)
        assert table.position_of_name(name) == one.position_of_name(name)


@FAST
@given(keys=st.lists(KEYS, unique=True).map(sorted), probes=st.lists(KEYS, max_size=5))
def test_entry_table_names_and_lookups_equal_decoding_each_key(
    keys: list[bytes], probes: list[bytes]
) -> None:
    value = encode_entry(BundleEntry(1, (), 0, 0, 4, 7))
    columns = decode_columns(value * len(keys), _offsets([value] * len(keys)))
    table = EntryTable(bytearray(b"".join(keys)), _offsets(keys), columns)
    assert len(table) == len(keys)
    assert table.names(np.arange(len(keys))) == [key_from_bytes(k) for k in keys]
    assert [table.raw(i) for i in range(len(keys))] == keys
    for i, key in enumerate(keys):
        assert table.position(key) == i
    for probe in probes:
        assert table.position(probe) == (keys.index(probe) if probe in keys else None)
    assert table.starting_with_nul().tolist() == [i for i, k in enumerate(keys) if k[:1] == b"\0"]


@FAST
@given(keys=st.lists(st.text(max_size=6), unique=True).map(sorted), probes=st.lists(st.text()))
def test_entry_table_position_of_name_equals_position_of_its_bytes(
    keys: list[str], probes: list[str]
) -> None:
    raws = sorted(key_to_bytes(k) for k in keys)
    value = encode_entry(BundleEntry(1, (), 0, 0, 4, 7))
    columns = decode_columns(value * len(raws), _offsets([value] * len(raws)))
    table = EntryTable(bytearray(b"".join(raws)), _offsets(raws), columns)
    for name in [*keys, *probes]:
        assert table.position_of_name(name) == table.position(key_to_bytes(name))


@pytest.mark.anyio
async def test_v2_reader_answers_the_same_before_and_after_keys(tmp_path: Path) -> None:
    full = np.arange(60, dtype=np.float32).reshape(10, 6)
    tensors = {
        "w": Partitioned((10, 6), [([(0, 4), (0, 6)], full[:4]), ([(4, 6), (0, 6)], full[4:])]),
        "a/b": np.ones(3, dtype=np.int64),
        "s": np.array([b"x", b"yz"], dtype=object),
        "caf\u00e9": np.float32(2.5),
        **{f"t{i:05d}": np.full(2, i, dtype=np.float32) for i in range(300)},
    }
    prefix = str(tmp_path / "ckpt")
    await anyckpt.save(prefix, tensors, durable=False)
    names = sorted(tensors, key=key_to_bytes)
    async with anyckpt.open(prefix) as lazy, anyckpt.open(prefix) as full_reader:
        before = {k: lazy.spec(k) for k in names}
        assert full_reader.keys() == names  # every entry decoded: columns from here on
        assert {k: full_reader.spec(k) for k in names} == before
        for missing in ["", "t", "t00300", "w\0", "\udcff"]:
            with pytest.raises(KeyError):
                full_reader.spec(missing)
        everything = await full_reader.read_many()
        assert list(everything) == names
        some = await full_reader.read_many(["t00007", "w", "caf\u00e9"])
        assert list(some) == ["t00007", "w", "caf\u00e9"]
        for key in names:
            expected = await lazy.read(key)
            assert np.array_equal(everything[key], expected)
            assert np.array_equal(await full_reader.read(key), expected)
        assert np.array_equal(everything["w"], full)


@pytest.mark.anyio
@pytest.mark.parametrize("odd", ["none", "non-ascii", "partitioned"])
async def test_an_index_of_several_pieces_reads_as_the_entries_one_by_one(
    tmp_path: Path, odd: str
) -> None:
    """40,000 entries: the index is decoded in three pieces (16,384 entries each at least) and
    dropped once every entry is in columns; listing, specs, reads and misses after that agree
    with a reader that looks each key up in the index."""
    tensors: dict[str, object] = {f"t{i:05d}": np.full(2, i, dtype=np.int32) for i in range(40_000)}
    if odd == "non-ascii":
        tensors["t20000\u00e9"] = np.float32(7)  # in the middle: the second piece
    elif odd == "partitioned":
        full = np.arange(12, dtype=np.float32).reshape(4, 3)
        tensors["t30000p"] = Partitioned(
            (4, 3), [([(0, 2), (0, 3)], full[:2]), ([(2, 2), (0, 3)], full[2:])]
        )
    prefix = str(tmp_path / "ckpt")
    await anyckpt.save(prefix, tensors, durable=False)
    names = sorted(tensors, key=key_to_bytes)
    async with anyckpt.open(prefix) as lazy, anyckpt.open(prefix) as loaded:
        assert loaded.keys() == names
        probe = names[::997] + names[-3:]
        assert [loaded.spec(k) for k in probe] == [lazy.spec(k) for k in probe]
        for missing in ["t40000", "t1", "\udcff", "t20000\u00e8"]:
            with pytest.raises(KeyError):
                loaded.spec(missing)
        got = await loaded.read_many(probe)
        for key in probe:
            assert np.array_equal(got[key], await lazy.read(key))
        assert len(await loaded.read_many()) == len(names)


@pytest.mark.anyio
@pytest.mark.parametrize("extra", ["plain", "partitioned", "non-ascii"])
async def test_key_view_is_keys_made_lazily(tmp_path: Path, extra: str) -> None:
    """``key_view`` (what ``inspect`` and ``verify`` walk: no list of every name) answers as
    the list ``keys()`` returns: length, order, indexing, slices and membership, with the
    slices of a partitioned tensor left out and non-ASCII names decoded."""
    tensors: dict[str, object] = {f"t{i:05d}": np.full(2, i, dtype=np.float32) for i in range(40)}
    if extra == "partitioned":
        full = np.arange(12, dtype=np.float32).reshape(4, 3)
        tensors["p"] = Partitioned(
            (4, 3), [([(0, 2), (0, 3)], full[:2]), ([(2, 2), (0, 3)], full[2:])]
        )
    elif extra == "non-ascii":
        tensors["caf\u00e9"] = np.float32(1)
    prefix = str(tmp_path / "ckpt")
    await anyckpt.save(prefix, tensors, durable=False)
    async with anyckpt.open(prefix) as reader:
        view = key_view(reader)
        keys = reader.keys()
    assert not isinstance(view, list)  # V2: the lazy view, not the list itself
    assert len(view) == len(keys)
    assert list(view) == keys
    assert [view[i] for i in range(-len(keys), len(keys))] == keys + keys
    assert view[3:9] == keys[3:9]
    assert view[::7] == keys[::7]
    assert view[5:2] == []
    for key in keys:
        assert key in view
    for absent in ["", "t", "t00040", "p\0", 7, "\udcff"]:
        assert absent not in view
    with pytest.raises(IndexError):
        view[len(keys)]

"""The column-wise encoders give exactly the bytes of the entry-by-entry ones they replace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.codecs.bundle import BundleEntry, encode_entry
from anyckpt.codecs.bundle_packed import encode_entries, entry_head
from anyckpt.codecs.crc import crc32c, mask, mask_many
from anyckpt.codecs.packed import (
    Column,
    PackedBytes,
    bytes_column,
    fixed32_column,
    interleave,
    varint_column,
)
from anyckpt.codecs.table import TableBuilder, read_table
from anyckpt.codecs.table_packed import build_table_packed
from anyckpt.codecs.varint import encode_varint

u64 = st.integers(0, (1 << 64) - 1)


@given(st.lists(u64, max_size=50), st.sampled_from([None, 0x08, 0x35]), st.booleans())
def test_varint_column_matches_encode_varint(
    values: list[int], tag: int | None, omit: bool
) -> None:
    column = varint_column(np.array(values, dtype=np.uint64), tag=tag, omit_zero=omit)
    for i, value in enumerate(values):
        expected = (
            b"" if omit and value == 0 else bytes([tag] if tag else []) + encode_varint(value)
        )
        assert column.item(i) == expected


@given(st.lists(st.integers(0, 0xFFFFFFFF), max_size=50), st.booleans())
def test_fixed32_column(values: list[int], omit: bool) -> None:
    column = fixed32_column(np.array(values, dtype=np.uint32), tag=0x35, omit_zero=omit)
    for i, value in enumerate(values):
        expected = b"" if omit and not value else b"\x35" + value.to_bytes(4, "little")
        assert column.item(i) == expected


@given(st.lists(st.lists(st.binary(max_size=20), min_size=3, max_size=3), max_size=40))
def test_interleave_concatenates_each_record(records: list[list[bytes]]) -> None:
    columns = [bytes_column([r[k] for r in records]) for k in range(3)]
    out = interleave(columns)
    assert out.data.tobytes() == b"".join(b"".join(r) for r in records)
    assert [out.item(i) for i in range(len(records))] == [b"".join(r) for r in records]


def test_interleave_rejects_ragged_columns() -> None:
    with pytest.raises(ValueError, match="lengths"):
        interleave([bytes_column([b"a"]), bytes_column([b"a", b"b"])])


def test_interleave_spans_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from anyckpt.codecs import packed

    monkeypatch.setattr(packed, "_CHUNK_RECORDS", 3)
    records = [bytes([i]) * (i % 4) for i in range(20)]
    out = interleave([bytes_column(records), bytes_column(records[::-1])])
    assert out.data.tobytes() == b"".join(
        a + b for a, b in zip(records, records[::-1], strict=True)
    )


@given(
    st.lists(st.tuples(st.integers(0, 15_000), st.integers(0, 6)), min_size=1, max_size=60),
    st.integers(1, 8),
)
def test_interleave_gathers_fields_scattered_over_a_large_source(
    fields: list[tuple[int, int]], chunk: int
) -> None:
    """A column whose records point anywhere in a large buffer (each chunk's span far larger
    than the bytes it reads: gathered, not sliced) lays out the same bytes as item by item."""
    from anyckpt.codecs import packed

    data = (np.arange(16_000) % 251).astype(np.uint8)
    starts = np.array([start for start, _ in fields], dtype=np.int64)
    lengths = np.array([n for _, n in fields], dtype=np.int64)
    scattered = Column(data, starts, lengths)
    ordered = bytes_column([bytes([i]) * (i % 3) for i in range(len(fields))])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed, "_CHUNK_RECORDS", chunk)
        out = interleave([ordered, scattered, ordered])
    records = [ordered.item(i) + scattered.item(i) + ordered.item(i) for i in range(len(fields))]
    assert out.data.tobytes() == b"".join(records)
    assert [out.item(i) for i in range(len(fields))] == records


@given(st.lists(st.integers(0, 0xFFFFFFFF), max_size=100))
def test_mask_many_matches_mask(values: list[int]) -> None:
    assert mask_many(np.array(values, dtype=np.uint32)).tolist() == [mask(v) for v in values]


entries = st.builds(
    BundleEntry,
    dtype=st.integers(0, 30),
    shape=st.lists(st.integers(0, 1 << 40), max_size=4).map(tuple),
    shard_id=st.integers(0, (1 << 31) - 1),
    offset=st.integers(0, (1 << 63) - 1),
    size=st.integers(0, (1 << 63) - 1),
    crc32c=st.integers(0, 0xFFFFFFFF),
)


@given(st.lists(entries, max_size=30))
def test_encode_entries_matches_encode_entry(items: list[BundleEntry]) -> None:
    heads = [entry_head(e.dtype, e.shape) for e in items]
    assert all(h is not None for h in heads)
    column = encode_entries(
        heads,  # type: ignore[arg-type]
        np.array([e.shard_id for e in items], dtype=np.int64),
        np.array([e.offset for e in items], dtype=np.int64),
        np.array([e.size for e in items], dtype=np.int64),
        np.array([e.crc32c for e in items], dtype=np.uint32),
    )
    assert [column.item(i) for i in range(len(items))] == [encode_entry(e) for e in items]


def _reference(keys: list[bytes], values: list[bytes], block_size: int) -> bytes:
    builder = TableBuilder(block_size=block_size)
    for key, value in zip(keys, values, strict=True):
        builder.add(key, value)
    return builder.finish()


# Keys drawn from a small alphabet share long prefixes; a few are longer than the packed
# builder's comparison window (128 bytes); values cross the one-byte varint length.
keys_strategy = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.text("ab\x00", max_size=20).map(str.encode),
        st.text("ab", min_size=120, max_size=300).map(str.encode),
    ),
    unique=True,
    max_size=120,
).map(sorted)


@settings(max_examples=300)
@given(
    keys_strategy,
    st.data(),
    st.sampled_from([1, 7, 64, 300, 4096, 256 * 1024]),
)
def test_packed_table_is_byte_identical(keys: list[bytes], data: st.DataObject, size: int) -> None:
    values = [data.draw(st.binary(max_size=200)) for _ in keys]
    packed = build_table_packed(keys, bytes_column(values), block_size=size)
    assert packed == _reference(keys, values, size)
    assert read_table(packed) == list(zip(keys, values, strict=True))


def test_packed_table_with_keys_compared_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared prefixes found a few keys at a time (and keys joined a few at a time) give the
    same table: each chunk compares its first key with the last of the chunk before."""
    from anyckpt.codecs import packed, table_packed

    monkeypatch.setattr(table_packed, "_PREFIX_ROWS", 5)
    monkeypatch.setattr(packed, "_CHUNK_RECORDS", 7)
    keys = sorted({f"m/{i % 13:x}/{'l' * (i % 4)}{i:04d}".encode() for i in range(400)})
    values = [bytes([i % 251]) * (i % 6) for i in range(len(keys))]
    for size in (64, 4096):
        table = build_table_packed(keys, bytes_column(values), block_size=size)
        assert table == _reference(keys, values, size)


def test_packed_table_of_many_entries_spans_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_BLOCK_WINDOW", 8)  # the window must grow
    keys = sorted(f"model/layer_{i:05d}/kernel".encode() for i in range(3000))
    values = [crc32c(k).to_bytes(4, "little") * (1 + i % 5) for i, k in enumerate(keys)]
    for size in (512, 64 << 10):
        assert build_table_packed(keys, bytes_column(values), block_size=size) == _reference(
            keys, values, size
        )


def test_packed_table_rejects_unsorted_or_mismatched() -> None:
    with pytest.raises(ValueError, match="increase"):
        build_table_packed([b"b", b"a"], bytes_column([b"", b""]))
    with pytest.raises(ValueError, match="increase"):
        build_table_packed([b"a", b"a"], bytes_column([b"", b""]))
    with pytest.raises(ValueError, match="values"):
        build_table_packed(
            [b"a"], Column(np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        )


def test_empty_table() -> None:
    assert build_table_packed([], bytes_column([])) == TableBuilder().finish()


@pytest.mark.parametrize("gather_bytes", [64, 8 << 20])
def test_data_file_and_index_of_every_kind_of_tensor(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, gather_bytes: int
) -> None:
    """Plain small tensors (written in bulk) interleaved in key order with strings, bfloat16,
    big-endian, strided and large ones: the data file is each tensor's little-endian bytes in
    key order, and each index entry has the right offset, size and masked CRC."""
    import anyio
    import ml_dtypes

    import anyckpt
    from anyckpt.codecs.bundle import decode_entry, encode_string_tensor
    from anyckpt.codecs.crc import masked_crc32c
    from anyckpt.formats import v2_data

    monkeypatch.setattr(v2_data, "GATHER_BYTES", gather_bytes)
    monkeypatch.setattr(v2_data, "PARALLEL_BYTES", 4096)  # "large" from 4 KiB on
    rng = np.random.default_rng(0)
    state: dict[str, object] = {}
    for i in range(40):
        kind = i % 6
        if kind == 0:
            value: object = rng.standard_normal(i + 1).astype(np.float32)
        elif kind == 1:
            value = np.array([f"s{i}".encode(), b"\xff" * i], dtype=object)
        elif kind == 2:
            value = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
        elif kind == 3:
            value = np.arange(i, dtype=">i8")
        elif kind == 4:
            value = np.arange(60, dtype=np.int16).reshape(6, 10)[:, ::3]
        else:
            value = rng.standard_normal(2048).astype(np.float32)  # 8 KiB: "large"
        state[f"t/{i:03d}"] = value
    state["t/big_big_endian"] = np.arange(3000, dtype=">f8")  # large, copied to little-endian
    state["t/big_strided"] = np.arange(20000, dtype=np.float32)[::2]  # large, copied
    prefix = f"{tmp_path}/ckpt"
    anyio.run(lambda: anyckpt.save(prefix, state, durable=False))
    data = open(prefix + ".data-00000-of-00001", "rb").read()  # noqa: SIM115
    table = dict(read_table(open(prefix + ".index", "rb").read()))  # noqa: SIM115
    offset = 0
    for key in sorted(state):
        value = state[key]
        if isinstance(value, np.ndarray) and value.dtype == object:
            stored, crc = encode_string_tensor(value.tolist())
        else:
            array = np.asarray(value)
            stored = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
            crc = masked_crc32c(stored)
        entry = decode_entry(table[key.encode()])
        assert (entry.offset, entry.size, entry.crc32c) == (offset, len(stored), crc), key
        assert data[offset : offset + len(stored)] == stored, key
        offset += len(stored)
    assert offset == len(data)


def test_write_many_finishes_short_writes_of_arrays(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writev may write less than asked, also in the middle of an array given as is."""
    import os

    from anyckpt.storage import Storage

    real = os.writev

    def short(fd: int, buffers: list[object]) -> int:
        return real(fd, [memoryview(b).cast("B")[:7] for b in buffers[:1]])  # type: ignore[arg-type]

    monkeypatch.setattr(os, "writev", short)
    arrays = [np.arange(n, dtype=np.float64) for n in (0, 3, 1, 5)]
    storage, path = Storage.from_url(f"{tmp_path}/f")
    writer = storage.open_writer(path, durable=False)
    writer.write_many(arrays)  # type: ignore[attr-defined]
    writer.commit()
    assert open(f"{tmp_path}/f", "rb").read() == b"".join(a.tobytes() for a in arrays)  # noqa: SIM115


def test_large_tensor_read_in_chunks_is_checked(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flipped byte anywhere in a large tensor read chunk by chunk is caught; with
    ``verify=False`` the bytes come back as stored."""
    import anyio

    import anyckpt
    from anyckpt.errors import CorruptCheckpointError
    from anyckpt.formats import v2_reader

    monkeypatch.setattr(v2_reader, "PARALLEL_BYTES", 4096)
    array = np.arange(50_000, dtype=np.float32)
    prefix = f"{tmp_path}/ckpt"
    anyio.run(lambda: anyckpt.save(prefix, {"a": array, "b": array[:10]}))
    loaded = anyio.run(lambda: anyckpt.load(prefix))
    np.testing.assert_array_equal(loaded["a"], array)
    data_file = prefix + ".data-00000-of-00001"
    with open(data_file, "r+b") as f:
        f.seek(150_001)
        byte = f.read(1)
        f.seek(150_001)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CorruptCheckpointError, match="'a'"):
        anyio.run(lambda: anyckpt.load(prefix))
    raw = anyio.run(lambda: anyckpt.load(prefix, verify=False))
    assert raw["a"].tobytes() != array.tobytes()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=60), st.binary(max_size=3))
def test_packed_bytes_is_a_sequence_of_its_items(items: list[bytes], first: bytes) -> None:
    packed = PackedBytes.join(iter(items), len(items))
    assert len(packed) == len(items)
    assert list(packed) == items
    assert [packed[i] for i in range(-len(items), len(items))] == items + items
    assert packed[2:-3] == items[2:-3]
    assert packed[::-2] == items[::-2]
    with pytest.raises(IndexError):
        packed[len(items)]
    column = bytes_column(packed)
    assert [column.item(i) for i in range(len(items))] == items
    assert list(packed.with_first(first)) == [first, *items]
    assert not packed.with_first(first).increasing


def test_packed_bytes_across_chunks_and_increasing() -> None:
    items = [b"k%06d" % i for i in range(10_000)]
    packed = PackedBytes.join(items, len(items), increasing=True)
    assert list(packed) == items
    assert packed.starts.dtype == np.int32
    headed = packed.with_first(b"")
    assert headed.increasing
    assert headed.data is packed.data  # the empty first name shares the buffer
    assert not packed.with_first(b"z").increasing


def test_packed_keys_build_the_same_table() -> None:
    keys = sorted({bytes([65 + i % 26]) * (1 + i % 150) + b"%d" % i for i in range(3000)})
    values = bytes_column([b"v%d" % i for i in range(len(keys))])
    packed = PackedBytes.join(keys, len(keys), increasing=True)
    assert build_table_packed(packed, values) == build_table_packed(keys, values)
    twice = PackedBytes.join([b"a", b"b", b"b"], 3, increasing=True)  # claimed, not so
    with pytest.raises(ValueError, match="strictly increase"):
        build_table_packed(twice, bytes_column([b"", b"", b""]))


def test_packed_bytes_from_rows_and_from_pieces() -> None:
    from anyckpt.codecs.packed import row_pieces

    names = [b"b%d" % i for i in range(9000)] + [b"a"]
    width = max(map(len, names))
    rows = np.array(names, dtype=f"S{width}").view(np.uint8).reshape(len(names), width)
    order = np.argsort(np.array(names, dtype=f"S{width}"), kind="stable").astype(np.int32)
    lengths = np.array([len(names[i]) for i in order.tolist()], dtype=np.int32)
    expected = sorted(names)
    assert list(PackedBytes.from_rows(rows, order, lengths, increasing=True)) == expected
    pieces = row_pieces(rows, order, lengths)
    assert len(pieces) > 1  # a chunk of rows each
    packed = PackedBytes.from_pieces(pieces, lengths, increasing=True)
    assert pieces == []  # emptied: freed once joined
    assert list(packed) == expected
    assert packed.lengths.dtype == np.int32
    assert packed.increasing

"""Property tests of the sans-I/O codecs: table, varint, ordered code, string tensors, CRC."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from anyckpt.codecs import DecodeError
from anyckpt.codecs.bundle import (
    BundleEntry,
    decode_entry,
    decode_header,
    decode_string_tensor,
    encode_entry,
    encode_header,
    encode_string_tensor,
)
from anyckpt.codecs.crc import crc32c, mask, masked_crc32c, unmask
from anyckpt.codecs.ordered_code import (
    decode_tensor_name_slice,
    encode_tensor_name_slice,
    read_num_increasing,
    read_signed_num_increasing,
    read_string,
    write_num_increasing,
    write_signed_num_increasing,
    write_string,
)
from anyckpt.codecs.table import (
    FOOTER_SIZE,
    MAGIC,
    TableBuilder,
    build_table,
    read_table,
    short_successor,
    shortest_separator,
)
from anyckpt.codecs.varint import decode_varint, encode_varint

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
UINT64 = st.integers(0, (1 << 64) - 1)
UINT32 = st.integers(0, (1 << 32) - 1)
#: Byte strings rich in the bytes that need escaping.
TRICKY_BYTES = st.binary(max_size=24) | st.lists(
    st.sampled_from([0x00, 0x01, 0xFE, 0xFF, 0x61]), max_size=24
).map(bytes)

FAST = settings(max_examples=100, deadline=None)


def sorted_entries(
    max_entries: int, key_size: int = 12, value_size: int = 40
) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    return st.lists(
        st.tuples(st.binary(max_size=key_size), st.binary(max_size=value_size)),
        max_size=max_entries,
        unique_by=lambda kv: kv[0],
    ).map(sorted)


# -- table ----------------------------------------------------------------------------------


@FAST
@given(entries=sorted_entries(200), block_size=st.integers(1, 512))
def test_table_round_trip(entries: list[tuple[bytes, bytes]], block_size: int) -> None:
    builder = TableBuilder(block_size=block_size)
    for key, value in entries:
        builder.add(key, value)
    data = builder.finish()
    assert read_table(data) == entries


def _count_data_blocks(data: bytes) -> int:
    """The number of entries in the index block (one per data block)."""
    from anyckpt.codecs.table import BlockHandle, block_entries, read_block

    footer = len(data) - FOOTER_SIZE
    _, pos = BlockHandle.decode(data, footer)
    index_handle, _ = BlockHandle.decode(data, pos)
    return sum(1 for _ in block_entries(read_block(data, index_handle, "index"), "index"))


def test_table_small_blocks_form_several_data_blocks() -> None:
    entries = [(b"key%05d" % i, b"v" * (i % 7)) for i in range(500)]
    builder = TableBuilder(block_size=256)
    for key, value in entries:
        builder.add(key, value)
    data = builder.finish()
    assert _count_data_blocks(data) > 10
    assert read_table(data) == entries
    # The default block size keeps this in one block, as TF does for small indexes.
    assert _count_data_blocks(build_table(entries)) == 1
    assert read_table(build_table(entries)) == entries


def test_table_builder_rejects_unsorted_keys() -> None:
    builder = TableBuilder()
    builder.add(b"b", b"")
    with pytest.raises(ValueError, match="strictly increase"):
        builder.add(b"a", b"")
    with pytest.raises(ValueError, match="strictly increase"):
        builder.add(b"b", b"")


def test_empty_table_layout() -> None:
    data = build_table([])
    assert read_table(data) == []
    # Metaindex block: no entries, one restart at 0 (FORMAT_NOTES §3).
    assert data.startswith(bytes.fromhex("0000000001000000"))
    assert data[-8:] == bytes.fromhex("57fb808b247547db")
    assert struct.unpack("<Q", data[-8:])[0] == MAGIC


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=400))
@example(data=b"\0" * 40 + bytes.fromhex("57fb808b247547db"))
@example(data=b"\xff" * 10 + b"\x7f" + b"\0" * 29 + bytes.fromhex("57fb808b247547db"))
def test_read_table_on_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        read_table(data)


@st.composite
def mutated_table(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bytes]:
    entries = draw(sorted_entries(40, value_size=20))
    block_size = draw(st.sampled_from([1, 64, 4096]))
    builder = TableBuilder(block_size=block_size)
    for key, value in entries:
        builder.add(key, value)
    data = bytearray(builder.finish())
    kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set":
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    elif kind == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut] if draw(st.booleans()) else data[cut:]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    else:
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return entries, bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_table())
def test_read_table_on_mutated_bytes(case: tuple[list[tuple[bytes, bytes]], bytes]) -> None:
    """Damage is detected (DecodeError), or it hit an unchecked spot (the footer's
    padding or metaindex handle) and the entries are exactly the original ones."""
    entries, data = case
    try:
        result = read_table(data)
    except DecodeError:
        pass
    else:
        assert result == entries


def test_separator_keys_match_tf() -> None:
    # FORMAT_NOTES §3: `q` after a block ending at `plain/b`, `{` after `z_tiny`.
    assert short_successor(b"plain/b") == b"q"
    assert short_successor(b"z_tiny") == b"{"
    assert short_successor(b"zero_size/string") == b"{"
    assert short_successor(b"\xff\xff") == b"\xff\xff"
    assert shortest_separator(b"abcd", b"abzz") == b"abd"
    assert shortest_separator(b"abc", b"abd") == b"abc"  # no room between c and d
    assert shortest_separator(b"ab", b"abc") == b"ab"  # a prefix


@FAST
@given(a=st.binary(max_size=8), b=st.binary(max_size=8))
def test_shortest_separator_property(a: bytes, b: bytes) -> None:
    assume(a != b)
    start, limit = min(a, b), max(a, b)
    sep = shortest_separator(start, limit)
    assert start <= sep < limit
    assert len(sep) <= len(start)
    assert short_successor(start) >= start


# -- varint ---------------------------------------------------------------------------------


@FAST
@given(value=UINT64, prefix=st.binary(max_size=4), suffix=st.binary(max_size=4))
@example(value=0, prefix=b"", suffix=b"")
@example(value=(1 << 64) - 1, prefix=b"", suffix=b"")
def test_varint_round_trip(value: int, prefix: bytes, suffix: bytes) -> None:
    encoded = encode_varint(value)
    assert 1 <= len(encoded) <= 10
    assert decode_varint(prefix + encoded + suffix, len(prefix)) == (
        value,
        len(prefix) + len(encoded),
    )
    # A limit that cuts the varint short is an error.
    with pytest.raises(DecodeError):
        decode_varint(prefix + encoded, len(prefix), len(prefix) + len(encoded) - 1)


@FAST
@given(data=st.binary(max_size=14))
def test_varint_decode_arbitrary_bytes(data: bytes) -> None:
    try:
        value, pos = decode_varint(data, 0)
    except DecodeError:
        return
    assert 0 <= value < 1 << 64
    assert 1 <= pos <= min(len(data), 10)


def test_varint_known_vectors_and_limits() -> None:
    assert encode_varint(0) == b"\x00"
    assert encode_varint(300) == bytes.fromhex("ac02")
    assert encode_varint((1 << 64) - 1) == b"\xff" * 9 + b"\x01"
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match="out of range"):
            encode_varint(bad)
    with pytest.raises(DecodeError, match="overflows"):
        decode_varint(b"\xff" * 9 + b"\x02", 0)
    with pytest.raises(DecodeError, match="longer than 10"):
        decode_varint(b"\x80" * 11, 0)
    with pytest.raises(DecodeError, match="truncated"):
        decode_varint(b"\x80", 0)


# -- ordered code ---------------------------------------------------------------------------


@FAST
@given(name=TRICKY_BYTES, extents=st.lists(st.tuples(INT64, INT64), max_size=8))
@example(name=b"\xff", extents=[])
@example(name=b"\x00\xff\xff\x00", extents=[(0, -1)])
def test_tensor_name_slice_round_trip(name: bytes, extents: list[tuple[int, int]]) -> None:
    key = encode_tensor_name_slice(name, extents)
    assert key[0] == 0  # slice keys sort before every full name
    assert decode_tensor_name_slice(key) == (name, tuple(extents))


@FAST
@given(value=TRICKY_BYTES, suffix=st.binary(max_size=4))
def test_string_round_trip(value: bytes, suffix: bytes) -> None:
    encoded = write_string(value)
    assert read_string(encoded + suffix, 0) == (value, len(encoded))


@FAST
@given(a=TRICKY_BYTES, b=TRICKY_BYTES)
def test_string_encoding_preserves_order(a: bytes, b: bytes) -> None:
    assert (a < b) == (write_string(a) < write_string(b))


@FAST
@given(a=INT64, b=INT64)
@example(a=-1, b=0)
@example(a=63, b=64)
@example(a=-65, b=-64)
@example(a=-(1 << 63), b=(1 << 63) - 1)
def test_signed_num_preserves_order(a: int, b: int) -> None:
    ea, eb = write_signed_num_increasing(a), write_signed_num_increasing(b)
    assert (a < b) == (ea < eb)
    assert (a == b) == (ea == eb)
    assert read_signed_num_increasing(ea + b"\x00\xff", 0) == (a, len(ea))


@FAST
@given(a=UINT64, b=UINT64)
def test_unsigned_num_round_trip_and_order(a: int, b: int) -> None:
    ea, eb = write_num_increasing(a), write_num_increasing(b)
    assert read_num_increasing(ea + b"\x01", 0) == (a, len(ea))
    assert (a < b) == (ea < eb)


@FAST
@given(data=st.binary(max_size=40))
def test_decode_name_slice_on_arbitrary_bytes(data: bytes) -> None:
    try:
        name, extents = decode_tensor_name_slice(data)
    except DecodeError:
        return
    # Whatever decodes re-encodes to the same bytes (the encoding is canonical).
    assert encode_tensor_name_slice(name, extents) == data


def test_ordered_code_known_vectors() -> None:
    # FORMAT_NOTES §7.
    assert encode_tensor_name_slice(b"v1/part", [(2, 2), (0, 2)]) == (
        b"\x00v1/part\x00\x01" + bytes.fromhex("0102 82 82 80 82")
    )
    assert encode_tensor_name_slice(b"part/w", [(4, 3), (0, 4)]) == (
        b"\x00part/w\x00\x01" + bytes.fromhex("0102 84 83 80 84")
    )
    assert write_signed_num_increasing(0) + write_signed_num_increasing(-1) == b"\x80\x7f"
    assert encode_tensor_name_slice(b"s", []) == b"\x00s\x00\x01\x00"  # scalar: rank 0
    # NUL is escaped as 00 ff (seen in TF output); ff as ff 00 (OrderedCode's other escape).
    assert write_string("a\0bÿc/ü".encode()) == b"a\x00\xffb\xc3\xbfc/\xc3\xbc\x00\x01"
    assert write_string(b"\xff") == b"\xff\x00\x00\x01"
    assert write_string(b"\x00\xff") == b"\x00\xff\xff\x00\x00\x01"
    for value in (-(1 << 63), -65, -64, 63, 64, (1 << 63) - 1):
        enc = write_signed_num_increasing(value)
        assert read_signed_num_increasing(enc, 0) == (value, len(enc))
    assert len(write_signed_num_increasing(63)) == 1
    assert len(write_signed_num_increasing(64)) == 2
    assert len(write_signed_num_increasing((1 << 63) - 1)) == 10
    with pytest.raises(ValueError, match="out of range"):
        write_signed_num_increasing(1 << 63)


# -- bundle records -------------------------------------------------------------------------


def test_bundle_known_vectors() -> None:
    # FORMAT_NOTES §4 and §5 (v2_large_entry's `a_tiny`).
    assert encode_header(1) == bytes.fromhex("08011a020801")
    assert decode_header(encode_header(2)) == 2
    a_tiny = BundleEntry(dtype=6, shape=(3,), shard_id=0, offset=0, size=3, crc32c=0x9E8BB740)
    encoded = encode_entry(a_tiny)
    assert encoded == bytes.fromhex("0806 120412020803 2803 3540b78b9e".replace(" ", ""))
    assert decode_entry(encoded) == a_tiny
    scalar = BundleEntry(dtype=1, shape=(), offset=5, size=4, crc32c=1)
    assert decode_entry(encode_entry(scalar)) == scalar
    partitioned = BundleEntry(dtype=1, shape=(10, 4), slices=(((0, 4), (0, -1)), ((4, 6), (0, 4))))
    assert decode_entry(encode_entry(partitioned)) == partitioned


@FAST
@given(
    dtype=st.integers(1, 30),
    shape=st.lists(st.integers(0, 1 << 40), max_size=6),
    shard=st.integers(0, 1000),
    offset=st.integers(0, (1 << 63) - 1),
    size=st.integers(0, (1 << 63) - 1),
    crc=UINT32,
)
def test_bundle_entry_round_trip(
    dtype: int, shape: list[int], shard: int, offset: int, size: int, crc: int
) -> None:
    entry = BundleEntry(dtype, tuple(shape), shard, offset, size, crc)
    assert decode_entry(encode_entry(entry)) == entry


@FAST
@given(
    shape=st.lists(st.integers(0, 1 << 40), min_size=1, max_size=4),
    slices=st.lists(
        st.lists(
            st.tuples(st.integers(0, (1 << 63) - 1), st.integers(-1, (1 << 63) - 1)),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_partitioned_entries_encoded_by_hand_equal_protobufs(
    shape: list[int], slices: list[list[tuple[int, int]]]
) -> None:
    """A partitioned entry's slices are encoded by hand: the same bytes as protobuf's
    deterministic serialization, which a partitioned entry used to go through."""
    from anyckpt.codecs.bundle import _encode_entry_proto

    entry = BundleEntry(1, tuple(shape), slices=tuple(tuple(e) for e in slices))
    assert encode_entry(entry) == _encode_entry_proto(entry)
    assert decode_entry(encode_entry(entry)) == entry


@FAST
@given(data=st.binary(max_size=60))
def test_decode_entry_on_arbitrary_bytes(data: bytes) -> None:
    try:
        entry = decode_entry(data)
    except DecodeError:
        return
    assert all(d >= 0 for d in entry.shape)
    assert min(entry.offset, entry.size, entry.shard_id) >= 0


@FAST
@given(values=st.lists(st.binary(max_size=300), max_size=20))
@example(values=[])
@example(values=[b""])
def test_string_tensor_round_trip(values: list[bytes]) -> None:
    data, crc = encode_string_tensor(values)
    assert decode_string_tensor(data, len(values), expected_crc=crc) == values
    assert decode_string_tensor(data, len(values)) == values
    # Layout: varint lengths, the masked CRC of the lengths as uint32, then the bytes.
    lengths32 = struct.pack(f"<{len(values)}I", *map(len, values))
    head = b"".join(encode_varint(len(v)) for v in values)
    assert data == head + struct.pack("<I", masked_crc32c(lengths32)) + b"".join(values)
    assert crc == mask(crc32c(lengths32 + data[len(head) :]))


@FAST
@given(values=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6), data=st.data())
def test_string_tensor_damage_is_detected(values: list[bytes], data: st.DataObject) -> None:
    encoded, crc = encode_string_tensor(values)
    pos = data.draw(st.integers(0, len(encoded) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(encoded)
    damaged[pos] ^= 1 << bit
    with pytest.raises(DecodeError):
        decode_string_tensor(bytes(damaged), len(values), expected_crc=crc)


def test_empty_string_tensor_has_the_mask_of_zero() -> None:
    data, crc = encode_string_tensor([])
    assert data == bytes.fromhex("d8ea82a2")  # FORMAT_NOTES §6
    assert crc == masked_crc32c(data)
    with pytest.raises(DecodeError):
        decode_string_tensor(b"\x05\x00", 3)


# -- CRC ------------------------------------------------------------------------------------


@FAST
@given(value=UINT32)
def test_mask_unmask_are_inverse(value: int) -> None:
    assert unmask(mask(value)) == value
    assert mask(unmask(value)) == value
    assert 0 <= mask(value) < 1 << 32


def test_crc_known_vectors() -> None:
    assert crc32c(b"") == 0
    assert masked_crc32c(b"") == 0xA282EAD8
    assert mask(0) == 0xA282EAD8
    # The standard CRC-32C check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283

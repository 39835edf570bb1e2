"""TensorFlow V2 tensor bundle records: the header, the per-tensor entries, string tensors.

``PREFIX.index`` is a table (see :mod:`.table`) whose key ``""`` holds a ``BundleHeaderProto``
and whose other keys hold one ``BundleEntryProto`` each: dtype, shape, which data shard, the
byte offset and size in it, and the masked CRC-32C of those bytes. Partitioned variables have a
full-name entry listing ``slices`` (no data) plus one entry per slice, keyed by
:func:`.ordered_code.encode_tensor_name_slice`.

String tensors are stored as ``[varint64 len_i]* [uint32 masked crc32c of the lengths as uint32]
[bytes_i]*``; the entry's checksum covers the lengths (as uint32), the stored length checksum and
the bytes, as ``tensor_bundle.cc`` computes it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import starmap
from typing import NamedTuple

import numpy as np

from .._proto import tensor_bundle_pb2
from . import DecodeError
from .crc import crc32c, mask
from .ordered_code import Extent
from .packed import interleave, varint_column
from .varint import decode_varint, encode_varint

HEADER_KEY = b""
BUNDLE_VERSION = 1  # kTensorBundleVersion; we read producer versions >= min consumer (0)
MAX_RANK = 254  # TensorShape's limit
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class BundleEntry:
    """One ``BundleEntryProto``. ``slices`` is set (and the location unset) for a partitioned
    variable's full-name entry; extents are (start, length) with length -1 for a whole dim."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: tuple[tuple[Extent, ...], ...] = ()


def encode_header(num_shards: int) -> bytes:
    header = tensor_bundle_pb2.BundleHeaderProto(num_shards=num_shards)
    header.version.producer = BUNDLE_VERSION
    return bytes(header.SerializeToString(deterministic=True))


def decode_header(data: bytes) -> int:
    """Parse the header; return the number of data shards."""
    header = tensor_bundle_pb2.BundleHeaderProto()
    try:
        header.ParseFromString(data)
    except Exception as exc:
        raise DecodeError(f"bad bundle header: {exc}") from None
    if header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE:
        raise DecodeError("big-endian bundles are not supported")
    if (
        header.version.min_consumer > BUNDLE_VERSION
        or BUNDLE_VERSION in header.version.bad_consumers
    ):
        raise DecodeError(
            f"bundle needs a newer reader (min_consumer {header.version.min_consumer})"
        )
    if not 1 <= header.num_shards <= 1 << 20:
        raise DecodeError(f"bad number of shards {header.num_shards}")
    return int(header.num_shards)


def _set_extents(
    proto: tensor_bundle_pb2.BundleEntryProto, slices: Sequence[Sequence[Extent]]
) -> None:
    for extents in slices:
        slice_proto = proto.slices.add()
        for start, length in extents:
            extent = slice_proto.extent.add()
            if start:
                extent.start = start
            if length != -1:
                extent.length = length


def _encode_entry_proto(entry: BundleEntry) -> bytes:
    proto = tensor_bundle_pb2.BundleEntryProto(
        dtype=entry.dtype,  # type: ignore[arg-type]
        shard_id=entry.shard_id,
        offset=entry.offset,
        size=entry.size,
        crc32c=entry.crc32c,
    )
    proto.shape.SetInParent()
    for dim in entry.shape:
        proto.shape.dim.add(size=dim)
    _set_extents(proto, entry.slices)
    return bytes(proto.SerializeToString(deterministic=True))


#: One-byte varints, precomputed (most lengths, dtypes and small dims).
_SMALL = [bytes([i]) for i in range(128)]
INT32_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1


def _varint(value: int) -> bytes:
    """encode_varint, with the one- to four-byte cases (every length, most offsets) unrolled."""
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes(
            (
                value & 0x7F | 0x80,
                (value >> 7) & 0x7F | 0x80,
                (value >> 14) & 0x7F | 0x80,
                value >> 21,
            )
        )
    return encode_varint(value)


#: Encoded dtype + shape fields by (dtype, shape): checkpoints repeat a few shapes many times.
_HEADS: dict[tuple[int, tuple[int, ...]], bytes | None] = {}
_HEADS_MAX = 4096


def encode_head(dtype: int, shape: tuple[int, ...]) -> bytes | None:
    """The dtype and shape fields, or None if a number is out of the hand-encoded range."""
    if not 0 <= dtype <= INT32_MAX:
        return None
    dims = []
    for dim in shape:
        if not 0 <= dim <= _INT64_MAX:
            return None
        if dim:
            body = b"\x08" + _varint(dim)
            dims.append(b"\x12" + _SMALL[len(body)] + body)
        else:
            dims.append(b"\x12\x00")
    encoded = b"".join(dims)
    head = b"\x08" + _varint(dtype) if dtype else b""
    return head + b"\x12" + _varint(len(encoded)) + encoded


def encode_entry(entry: BundleEntry) -> bytes:
    """The ``BundleEntryProto`` bytes, as protobuf's deterministic serialization writes them.

    An ordinary entry (no slices, every number non-negative) is encoded by hand: this runs
    once per tensor, and building a protobuf message costs several times more. Fields go in
    field-number order, zero (default) scalars are left out, and the shape is always present
    (``SetInParent``), each dim a submessage whose zero size is left out too; a partitioned
    entry's slices follow. Anything else (out-of-range numbers) goes through protobuf itself.
    """
    shard_id, offset, size, crc = entry.shard_id, entry.offset, entry.size, entry.crc32c
    slices = _encode_slices(entry.slices) if entry.slices else b""
    if (
        slices is None
        or not 0 <= shard_id <= INT32_MAX
        or not 0 <= offset <= _INT64_MAX
        or not 0 <= size <= _INT64_MAX
        or not 0 <= crc <= 0xFFFFFFFF
    ):
        return _encode_entry_proto(entry)
    key = (entry.dtype, entry.shape)
    try:
        head = _HEADS[key]
    except KeyError:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        head = _HEADS[key] = encode_head(*key)
    if head is None:
        return _encode_entry_proto(entry)
    parts = [head]
    if shard_id:
        parts.append(b"\x18" + _varint(shard_id))
    if offset:
        parts.append(b"\x20" + _varint(offset))
    if size:
        parts.append(b"\x28" + _varint(size))
    if crc:
        parts.append(b"\x35" + _U32.pack(crc))
    parts.append(slices)
    return b"".join(parts)


def _encode_slices(slices: Sequence[Sequence[Extent]]) -> bytes | None:
    """Field 7 (``repeated TensorSliceProto slices``) by hand, or None where a number is out of
    the range this encodes (protobuf then does it). A partitioned tensor saved over thousands
    of ranks has thousands of slices: building them as messages dominated the merged index."""
    try:
        joined = [b"".join(starmap(_extent_field, extents)) for extents in slices]
    except ValueError:
        return None
    return b"".join([b"\x3a" + _varint(len(one)) + one for one in joined])


@functools.lru_cache(maxsize=1 << 16)
def _extent_field(start: int, length: int) -> bytes:
    """One ``extent`` of a ``TensorSliceProto`` (field 1), with its tag and length. Cached: the
    slices of a tensor split over many ranks share most of their extents."""
    if not 0 <= start <= _INT64_MAX or not -1 <= length <= _INT64_MAX:
        raise ValueError("out of range")
    extent = (b"\x08" + _varint(start) if start else b"") + (
        b"" if length == -1 else b"\x10" + _varint(length)
    )
    return b"\x0a" + _varint(len(extent)) + extent


def _decode_entry_proto(data: bytes) -> BundleEntry:
    proto = tensor_bundle_pb2.BundleEntryProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:
        raise DecodeError(f"bad bundle entry: {exc}") from None
    if proto.shape.unknown_rank or len(proto.shape.dim) > MAX_RANK:
        raise DecodeError("bad tensor shape")
    shape = tuple(int(d.size) for d in proto.shape.dim)
    if any(d < 0 for d in shape):
        raise DecodeError(f"negative dimension in shape {shape}")
    if proto.offset < 0 or proto.size < 0 or proto.shard_id < 0:
        raise DecodeError("negative offset, size or shard id")
    slices = tuple(
        tuple((int(e.start), int(e.length) if e.HasField("length") else -1) for e in s.extent)
        for s in proto.slices
    )
    return BundleEntry(
        dtype=int(proto.dtype),
        shape=shape,
        shard_id=int(proto.shard_id),
        offset=int(proto.offset),
        size=int(proto.size),
        crc32c=int(proto.crc32c),
        slices=slices,
    )


class NotCanonical(Exception):
    """The fast decoder met something it leaves to protobuf."""


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise NotCanonical


def decode_entry_fast(data: bytes) -> BundleEntry:
    """Decode an entry written in canonical form (each field once, in field order, no
    slices, no unknown fields, every number in range); raise NotCanonical for anything
    else, which protobuf then decodes (or rejects) exactly as before."""
    end = len(data)
    pos = 0
    dtype = 0
    tag = data[0] if end else -1
    if tag == 0x08:
        byte = data[1] if end > 1 else 0x80
        if byte < 0x80:
            dtype, pos = byte, 2
        else:
            dtype, pos = _read_varint(data, 1, end)
            if dtype > INT32_MAX:
                raise NotCanonical
        tag = data[pos] if pos < end else -1
    shape: tuple[int, ...] = ()
    if tag == 0x12:
        length = data[pos + 1] if pos + 1 < end else 0x80
        if length < 0x80:
            pos += 2
        else:
            length, pos = _read_varint(data, pos + 1, end)
        stop = pos + length
        if stop > end:
            raise NotCanonical
        dims = []
        while pos < stop:
            # A dim: 0x12 LEN [0x08 varint(size)]; anything else goes to protobuf.
            if data[pos] != 0x12 or pos + 1 >= stop:
                raise NotCanonical
            dim_len = data[pos + 1]
            if dim_len == 0:
                dims.append(0)
                pos += 2
                continue
            if dim_len >= 0x80 or pos + 2 >= stop or data[pos + 2] != 0x08:
                raise NotCanonical
            value, after = _read_varint(data, pos + 3, stop)
            if after != pos + 2 + dim_len or value > _INT64_MAX:
                raise NotCanonical
            dims.append(value)
            pos = after
        if pos != stop or len(dims) > MAX_RANK:
            raise NotCanonical
        shape = tuple(dims)
        tag = data[pos] if pos < end else -1
    return BundleEntry(dtype, shape, *_decode_tail(data, pos, end))


#: (dtype, shape) by the bytes of the dtype and shape fields, for entries whose dtype and
#: shape-length fit in one byte each: an index repeats a few of them many times.
DECODED_HEADS: dict[bytes, tuple[int, tuple[int, ...]]] = {}


def _decode_tail(data: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """shard_id, offset, size, crc32c: the fields after the shape, canonical form only."""
    shard_id = offset = size = crc = 0
    tag = data[pos] if pos < end else -1
    if tag == 0x18:
        shard_id, pos = _read_varint(data, pos + 1, end)
        if shard_id > INT32_MAX:
            raise NotCanonical
        tag = data[pos] if pos < end else -1
    if tag == 0x20:
        offset, pos = _read_varint(data, pos + 1, end)
        tag = data[pos] if pos < end else -1
    if tag == 0x28:
        size, pos = _read_varint(data, pos + 1, end)
        tag = data[pos] if pos < end else -1
    if tag == 0x35:
        if pos + 5 > end:
            raise NotCanonical
        (crc,) = _U32.unpack_from(data, pos + 1)
        pos += 5
    if pos != end or offset > _INT64_MAX or size > _INT64_MAX:
        raise NotCanonical
    return shard_id, offset, size, crc


def decode_entry(data: bytes) -> BundleEntry:
    """Parse one ``BundleEntryProto``. Entries as TensorFlow and anyckpt write them take a
    hand-written path (this runs once per tensor when an index is opened), with the dtype
    and shape of a repeated head looked up rather than parsed again; anything else is
    parsed by protobuf, with the same result and the same errors."""
    end = len(data)
    if end >= 4 and data[0] == 0x08 and data[1] < 0x80 and data[2] == 0x12 and data[3] < 0x80:
        split = 4 + data[3]
        known = DECODED_HEADS.get(data[:split])
        if known is not None:
            try:
                return BundleEntry(known[0], known[1], *_decode_tail(data, split, end))
            except NotCanonical:
                return _decode_entry_proto(data)
        try:
            entry = decode_entry_fast(data)
        except NotCanonical:
            return _decode_entry_proto(data)
        if len(DECODED_HEADS) >= 4096:
            DECODED_HEADS.clear()
        DECODED_HEADS[data[:split]] = (entry.dtype, entry.shape)
        return entry
    try:
        return decode_entry_fast(data)
    except NotCanonical:
        return _decode_entry_proto(data)


class EntryRecord(NamedTuple):
    """A decoded ``BundleEntryProto`` with the fields of :class:`BundleEntry`, as a tuple:
    several times cheaper to make, for readers that decode thousands of entries at once."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0
    slices: tuple[tuple[Extent, ...], ...] = ()


_new_tuple = tuple.__new__


def decode_record(data: bytes) -> EntryRecord:
    """:func:`decode_entry` as an :class:`EntryRecord` (same values, same errors)."""
    return decode_records((data,))[0]


def decode_records(values: Iterable[bytes]) -> list[EntryRecord]:
    """:func:`decode_entry` of each value, as :class:`EntryRecord` tuples (same values, same
    errors): the dtype and shape of a head seen before are looked up, and the rest of the
    entry parsed in one pass."""
    out: list[EntryRecord] = []
    append = out.append
    heads = DECODED_HEADS
    for data in values:
        end = len(data)
        if end >= 4 and data[0] == 0x08 and data[2] == 0x12 and data[1] < 0x80 and data[3] < 0x80:
            split = 4 + data[3]
            known = heads.get(data[:split])
            if known is not None:
                try:
                    tail = _decode_tail(data, split, end)
                except NotCanonical:
                    pass
                else:
                    append(_new_tuple(EntryRecord, (*known, *tail, ())))
                    continue
        entry = decode_entry(data)
        append(
            _new_tuple(
                EntryRecord,
                (
                    entry.dtype,
                    entry.shape,
                    entry.shard_id,
                    entry.offset,
                    entry.size,
                    entry.crc32c,
                    entry.slices,
                ),
            )
        )
    return out


def encode_string_tensor(values: Sequence[bytes]) -> tuple[bytes, int]:
    """Encode the elements of a string tensor (C order); return (bytes, masked entry CRC)."""
    lengths = np.fromiter(map(len, values), dtype=np.uint64, count=len(values))
    lengths32 = (lengths & np.uint64(0xFFFFFFFF)).astype("<u4").tobytes()
    length_crc = _U32.pack(mask(crc32c(lengths32)))
    body = b"".join(values)
    varints = interleave([varint_column(lengths)]).data.tobytes()  # all at once
    data = varints + length_crc + body
    entry_crc = mask(crc32c(body, crc32c(length_crc, crc32c(lengths32))))
    return data, entry_crc


def decode_string_tensor(
    data: bytes, count: int, *, expected_crc: int | None = None
) -> list[bytes]:
    """Decode ``count`` string elements from a string tensor's region (its exact bytes).

    With ``expected_crc`` (the entry's masked CRC), both the length checksum and the entry
    checksum are verified."""
    if count > len(data):  # every element takes at least one length byte
        raise DecodeError(f"string tensor of {count} elements cannot fit in {len(data)} bytes")
    lengths = []
    pos = 0
    for _ in range(count):
        n, pos = decode_varint(data, pos)
        lengths.append(n)
    if pos + 4 > len(data):
        raise DecodeError("string tensor truncated before its length checksum")
    total = sum(lengths)
    body_start = pos + 4
    if body_start + total != len(data):
        raise DecodeError(
            f"string tensor lengths add up to {total} bytes but {len(data) - body_start} are stored"
        )
    if expected_crc is not None:
        lengths32 = struct.pack(f"<{count}I", *(n & 0xFFFFFFFF for n in lengths))
        (stored,) = _U32.unpack_from(data, pos)
        if stored != mask(crc32c(lengths32)):
            raise DecodeError("string tensor length checksum mismatch")
        view = memoryview(data)
        actual = mask(crc32c(view[body_start:], crc32c(view[pos:body_start], crc32c(lengths32))))
        if actual != expected_crc:
            raise DecodeError(
                f"checksum mismatch (stored {expected_crc:#010x}, computed {actual:#010x})"
            )
    out = []
    at = body_start
    for n in lengths:
        out.append(data[at : at + n])
        at += n
    return out


def string_array(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """An object array of ``bytes`` with the given shape."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)

"""TensorFlow's legacy V1 checkpoint (``TensorSliceWriter``): sans-I/O encoding and decoding.

A V1 file is a sorted table (see :mod:`.table`). Key ``""`` holds ``SavedTensorSlices{meta}``
(one ``SavedSliceMeta`` per tensor: name, shape, dtype and every stored slice). Every other key
is :func:`.ordered_code.encode_tensor_name_slice` of (name, slice) and holds
``SavedTensorSlices{data: SavedSlice{name, slice, data: TensorProto}}``, where the TensorProto
sets only the typed repeated field of its dtype (``float_val``, ``int_val``...).

Tensor values are encoded and decoded here with NumPy, not through protobuf message objects:
fixed-width fields (float, double, complex) are the raw little-endian bytes, so they are written
from the caller's buffer without a copy; varint fields are converted a chunk at a time.

This module also has the table pieces the V1 format needs beyond :mod:`.table`: a streaming
:class:`TableWriter` (values given as buffer lists, output produced block by block, byte-identical
to :class:`.table.TableBuilder`) and helpers to read a table one block at a time.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._proto import saved_tensor_slice_pb2, tensor_slice_pb2, versions_pb2
from . import DecodeError
from .crc import crc32c, mask
from .dtypes import (
    DT_STRING,
    STRING_DTYPE,
    disk_dtype,
    dtype_from_enum,
    numpy_can_shape,
    tf_name,
)
from .ordered_code import Extent, encode_tensor_name_slice
from .table import (
    BLOCK_RESTART_INTERVAL,
    BLOCK_SIZE,
    BLOCK_TRAILER_SIZE,
    FOOTER_SIZE,
    MAGIC,
    NO_COMPRESSION,
    BlockHandle,
    key_bomb,
    key_budget,
    short_successor,
    shortest_separator,
)
from .varint import decode_varint, encode_varint

if TYPE_CHECKING:
    from typing_extensions import Buffer

META_KEY = b""
CHECKPOINT_VERSION = 1  # TF_CHECKPOINT_VERSION; producer written, min consumer 0
MAX_RANK = 254
#: TensorSliceWriter refuses a slice whose encoding may exceed this (kMaxMessageBytes).
MAX_SLICE_BYTES = 1 << 31
_CHUNK = 1 << 20  # elements per step of the varint converters
_SMALL = 64 << 10  # parts below this are coalesced before they are handed out
_U32 = struct.Struct("<I")

# -- protobuf wire helpers ----------------------------------------------------------------

_VARINT, _I64, WIRE_LEN, _I32 = 0, 1, 2, 5


def wire_tag(field: int, wire_type: int) -> bytes:
    """A protobuf field's tag: field number and wire type, as a varint."""
    return encode_varint(field << 3 | wire_type)


def _signed(value: int) -> int:
    return value & 0xFFFFFFFFFFFFFFFF


def len_field(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field holding ``payload``."""
    return wire_tag(field, WIRE_LEN) + encode_varint(len(payload)) + payload


# -- vectorised varints -------------------------------------------------------------------


def encode_varints(values: np.ndarray) -> np.ndarray:
    """Protobuf varints of ``values`` (uint64), concatenated, as uint8."""
    values = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    pieces = [_encode_varint_chunk(values[i : i + _CHUNK]) for i in range(0, len(values), _CHUNK)]
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate(pieces) if pieces else np.empty(0, np.uint8)


def _encode_varint_chunk(v: np.ndarray) -> np.ndarray:
    lengths = np.ones(len(v), dtype=np.int64)
    for k in range(1, 10):
        lengths += v >= np.uint64(1 << (7 * k))
    if not len(v) or int(lengths.max()) == 1:
        return v.astype(np.uint8)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for k in range(int(lengths.max())):
        sel = np.flatnonzero(lengths > k)
        byte = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= (lengths[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = byte
    return out


def decode_varints(data: bytes | memoryview, count: int) -> np.ndarray:
    """Exactly ``count`` concatenated varints from ``data`` (all of it), as uint64."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if count > len(raw):  # each varint takes at least one byte: refuse before allocating
        raise DecodeError(f"{len(raw)} bytes cannot hold {count} packed values")
    out = np.empty(count, dtype=np.uint64)
    done = 0
    pos = 0
    step = 8 * _CHUNK
    while pos < len(raw):
        window = raw[pos : pos + step]
        ends = np.flatnonzero(window < 0x80)
        if not len(ends):
            raise DecodeError("varint longer than 10 bytes" if len(window) > 10 else "truncated")
        window = window[: int(ends[-1]) + 1]
        n = len(ends)
        if done + n > count:
            raise DecodeError(f"more than {count} values in a packed field")
        out[done : done + n] = _decode_varint_chunk(window, ends)
        done += n
        pos += len(window)
    if done != count:
        raise DecodeError(f"{done} values in a packed field, expected {count}")
    return out


def _decode_varint_chunk(b: np.ndarray, ends: np.ndarray) -> np.ndarray:
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > 10:
        raise DecodeError("varint longer than 10 bytes")
    if longest == 1:
        return b.astype(np.uint64)
    out: np.ndarray = (b[starts] & 0x7F).astype(np.uint64)
    for k in range(1, longest):
        sel = np.flatnonzero(lengths > k)
        out[sel] |= (b[starts[sel] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out


# -- TensorProto typed fields -------------------------------------------------------------


@dataclass(frozen=True)
class TensorField:
    """The TensorProto field that holds a dtype's values, and how they are encoded."""

    number: int
    kind: str  # "fixed", "varint" or "bytes"


#: TensorProto field for each dtype V1 can hold (FORMAT_NOTES §7; tensor_slice_util / Fill).
TENSOR_FIELDS: dict[int, TensorField] = {
    1: TensorField(5, "fixed"),  # float32 -> float_val
    2: TensorField(6, "fixed"),  # float64 -> double_val
    3: TensorField(7, "varint"),  # int32 -> int_val
    4: TensorField(7, "varint"),  # uint8
    5: TensorField(7, "varint"),  # int16
    6: TensorField(7, "varint"),  # int8
    17: TensorField(7, "varint"),  # uint16
    9: TensorField(10, "varint"),  # int64 -> int64_val
    10: TensorField(11, "varint"),  # bool -> bool_val
    19: TensorField(13, "varint"),  # float16 -> half_val (the bits)
    8: TensorField(9, "fixed"),  # complex64 -> scomplex_val (re, im)
    18: TensorField(12, "fixed"),  # complex128 -> dcomplex_val
    DT_STRING: TensorField(8, "bytes"),  # string_val
}
V1_DTYPES = frozenset(TENSOR_FIELDS)


def check_v1_dtype(enum: int) -> None:
    """Raise ValueError for a dtype TensorFlow cannot store in a V1 checkpoint."""
    if enum not in TENSOR_FIELDS:
        raise ValueError(
            f"V1 checkpoints cannot hold {tf_name(enum)} (TensorFlow's V1 writer supports "
            f"{', '.join(sorted(tf_name(e) for e in TENSOR_FIELDS))}); use the v2 format"
        )


def _varint_values(array: np.ndarray, enum: int) -> np.ndarray:
    flat: np.ndarray = array.reshape(-1)
    if enum == 19:
        return flat.view(np.uint16).astype(np.uint64)
    if enum in (4, 17):
        return flat.astype(np.uint64)
    return flat.astype(np.int64).view(np.uint64)  # int32 sign-extends to 10 bytes, as protobuf


def encode_tensor_proto(array: np.ndarray, enum: int) -> list[Buffer]:
    """The bytes of ``TensorProto`` holding ``array`` in its typed field (and nothing else)."""
    field = TENSOR_FIELDS[enum]
    if array.size == 0:
        return []
    if field.kind == "bytes":
        items = array.reshape(-1).tolist()
        tag = wire_tag(field.number, WIRE_LEN)
        return [b"".join(tag + encode_varint(len(s)) + s for s in items)]
    if field.kind == "fixed":
        flat = np.ascontiguousarray(array, dtype=disk_dtype(array.dtype)).reshape(-1)
    elif enum == 10:
        flat = (array.reshape(-1) != 0).view(np.uint8)
    else:
        flat = encode_varints(_varint_values(np.ascontiguousarray(array), enum))
    payload = flat.data.cast("B")
    return [wire_tag(field.number, WIRE_LEN) + encode_varint(payload.nbytes), payload]


def _walk(data: memoryview) -> list[tuple[int, int, int, int]]:
    """(field, wire type, start, end) of every field of a message; the span is the payload
    for length-delimited fields and the encoded value otherwise."""
    fields: list[tuple[int, int, int, int]] = []
    pos, end = 0, len(data)
    while pos < end:
        key, pos = decode_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire == _VARINT:
            start = pos
            _, pos = decode_varint(data, pos, end)
        elif wire in (_I64, _I32):
            start = pos
            pos += 8 if wire == _I64 else 4
        elif wire == WIRE_LEN:
            length, start = decode_varint(data, pos, end)
            pos = start + length
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise DecodeError("protobuf field runs past the end of its message")
        fields.append((number, wire, start, pos))
    return fields


def iter_fields(data: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """:func:`_walk`, one field at a time (a message of a million fields makes no list:
    the meta; :func:`_walk`, for the small messages of an entry, is the faster list)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = decode_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire == _VARINT:
            start = pos
            _, pos = decode_varint(data, pos, end)
        elif wire in (_I64, _I32):
            start = pos
            pos += 8 if wire == _I64 else 4
        elif wire == WIRE_LEN:
            length, start = decode_varint(data, pos, end)
            pos = start + length
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise DecodeError("protobuf field runs past the end of its message")
        yield number, wire, start, pos


def decode_tensor_proto(data: memoryview, enum: int, count: int) -> np.ndarray:
    """The ``count`` elements (flat) of a TensorProto of dtype ``enum`` (a V1 dtype).

    Reads the typed field, packed or not; ``tensor_content`` is accepted when the typed field
    is empty. The result may share memory with ``data``.
    """
    field = TENSOR_FIELDS.get(enum)
    if field is None:
        raise DecodeError(f"V1 data of dtype {tf_name(enum)} is not supported")
    dtype = dtype_from_enum(enum)
    fixed_wire = _I32 if enum in (1, 8) else _I64  # float, or double, elements unpacked
    chunks: list[memoryview] = []
    content: memoryview | None = None
    for number, wire, start, end in _walk(data):
        value = data[start:end]
        if number == 4 and wire == WIRE_LEN:
            content = value
        if number != field.number:
            continue
        if field.kind == "bytes":
            if wire != WIRE_LEN:
                raise DecodeError("string_val with a non-bytes wire type")
            chunks.append(value)
        elif wire in (WIRE_LEN, _VARINT if field.kind == "varint" else fixed_wire):
            chunks.append(value)
        else:
            raise DecodeError(f"field {number} of {tf_name(enum)} data has wire type {wire}")
    if field.kind == "bytes":
        if len(chunks) != count:
            raise DecodeError(f"{len(chunks)} strings, expected {count}")
        strings = np.empty(count, dtype=STRING_DTYPE)
        for i, chunk in enumerate(chunks):
            strings[i] = bytes(chunk)
        return strings
    raw: bytes | memoryview
    if not chunks and content is not None and count:
        raw = content
        return _from_raw(raw, dtype, count, "tensor_content")
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if field.kind == "fixed":
        return _from_raw(raw, dtype, count, "the packed field")
    values = decode_varints(raw, count)
    out: np.ndarray
    if enum == 10:
        out = values != 0
    elif enum == 19:
        out = values.astype(np.uint16).view(np.float16)
    elif enum == 9:
        out = values.view(np.int64)
    else:
        out = values.view(np.int64).astype(dtype)
    return out


def _from_raw(raw: bytes | memoryview, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    size = memoryview(raw).nbytes
    if size != count * dtype.itemsize:
        raise DecodeError(
            f"{what} has {size} bytes, {count} elements of {dtype} need {count * dtype.itemsize}"
        )
    out: np.ndarray = np.frombuffer(raw, dtype=disk_dtype(dtype), count=count)
    return out


# -- slices -------------------------------------------------------------------------------


def encode_slice_proto(extents: Sequence[Extent]) -> bytes:
    """``TensorSliceProto`` bytes: per dimension an ``Extent`` with ``start`` unless 0 and
    ``length`` unless the whole dimension (-1)."""
    out = bytearray()
    for start, length in extents:
        body = b""
        if start:
            body += wire_tag(1, _VARINT) + encode_varint(_signed(start))
        if length != -1:
            body += wire_tag(2, _VARINT) + encode_varint(_signed(length))
        out += len_field(1, body)
    return bytes(out)


def _slice_from_proto(proto: tensor_slice_pb2.TensorSliceProto) -> tuple[Extent, ...]:
    return tuple(
        (int(e.start), int(e.length) if e.HasField("length") else -1) for e in proto.extent
    )


def decode_slice_proto(data: Buffer) -> tuple[Extent, ...]:
    proto = tensor_slice_pb2.TensorSliceProto()
    try:
        proto.ParseFromString(bytes(data))
    except Exception as exc:
        raise DecodeError(f"bad TensorSliceProto: {exc}") from None
    return _slice_from_proto(proto)


def slice_shape(extents: Sequence[Extent], shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d if n == -1 else n for (_, n), d in zip(extents, shape, strict=True))


def check_extents(extents: Sequence[Extent], shape: Sequence[int]) -> None:
    """Raise DecodeError unless ``extents`` is a slice of ``shape``."""
    if len(extents) != len(shape) and not (not extents and not shape):
        raise DecodeError(f"slice {tuple(extents)} does not have rank {len(shape)}")
    for (start, length), dim in zip(extents, shape, strict=False):
        if length == -1:
            if start != 0:
                raise DecodeError(f"slice {tuple(extents)}: a full extent starting at {start}")
        elif start < 0 or length < 0 or start + length > dim:
            raise DecodeError(f"slice {tuple(extents)} lies outside the shape {tuple(shape)}")


def whole(rank: int) -> tuple[Extent, ...]:
    """The slice that is the whole tensor."""
    return ((0, -1),) * rank


def encode_slice_entry(
    name: bytes, extents: Sequence[Extent], array: np.ndarray, enum: int
) -> tuple[bytes, list[Buffer]]:
    """(table key, value parts) of one saved slice; ``array`` is the slice's data."""
    tensor = encode_tensor_proto(array, enum)
    tensor_len = sum(memoryview(p).nbytes for p in tensor)
    head = (
        len_field(1, name)
        + len_field(2, encode_slice_proto(extents))
        + wire_tag(3, WIRE_LEN)
        + encode_varint(tensor_len)
    )
    if len(head) + tensor_len + 16 > MAX_SLICE_BYTES:
        raise ValueError(
            f"slice {tuple(extents)} of {name!r} encodes to more than 2 GiB, the most a V1 "
            "entry can hold; partition it (anyckpt.Partitioned) or use the v2 format"
        )
    outer = wire_tag(2, WIRE_LEN) + encode_varint(len(head) + tensor_len)
    return encode_tensor_name_slice(name, extents), [outer + head, *tensor]


@dataclass(frozen=True)
class SliceData:
    """A decoded data entry: the slice it claims to be and its TensorProto bytes."""

    name: bytes
    extents: tuple[Extent, ...]
    tensor: memoryview


def decode_slice_entry(value: memoryview) -> SliceData:
    """Split a data entry into name, slice and TensorProto (not yet decoded)."""
    saved: memoryview | None = None
    for number, wire, start, end in _walk(value):
        if number == 2 and wire == WIRE_LEN:
            saved = value[start:end]
    if saved is None:
        raise DecodeError("data entry has no SavedSlice")
    name, tensor = b"", memoryview(b"")
    extents: tuple[Extent, ...] = ()
    for number, wire, start, end in _walk(saved):
        if wire != WIRE_LEN:
            continue
        if number == 1:
            name = bytes(saved[start:end])
        elif number == 2:
            extents = decode_slice_proto(saved[start:end])
        elif number == 3:
            tensor = saved[start:end]
    return SliceData(name, extents, tensor)


# -- meta ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaTensor:
    """One ``SavedSliceMeta``: a tensor and the slices stored of it."""

    name: bytes
    dtype: int
    shape: tuple[int, ...]
    slices: tuple[tuple[Extent, ...], ...]


def encode_meta(tensors: Sequence[MetaTensor]) -> bytes:
    """The value of key ``""``: ``SavedTensorSlices{meta}``, tensors in the order given."""
    sts = saved_tensor_slice_pb2.SavedTensorSlices()
    meta = sts.meta
    for t in tensors:
        entry = meta.tensor.add()
        entry.name = t.name.decode("utf-8")
        entry.shape.SetInParent()
        for dim in t.shape:
            entry.shape.dim.add(size=dim)
        entry.type = t.dtype  # type: ignore[assignment]
        for extents in t.slices:
            proto = entry.slice.add()
            proto.ParseFromString(encode_slice_proto(extents))
    meta.versions.producer = CHECKPOINT_VERSION
    return bytes(sts.SerializeToString(deterministic=True))


def decode_meta(data: Buffer) -> list[MetaTensor]:
    """Parse and check the value of key ``""``."""
    return list(iter_meta(data))


def iter_meta(data: Buffer) -> Iterator[MetaTensor]:
    """:func:`decode_meta` one tensor at a time: the ``SavedTensorSlices`` wire format is
    walked by hand and each ``SavedSliceMeta`` parsed on its own, so a meta of a million
    tensors never becomes a million protobuf messages at once. The version check runs once
    every tensor was yielded (a consumer must exhaust the iterator before trusting them)."""
    versions = bytearray()
    has_meta = False
    for inner, payload in _meta_fields(memoryview(data).cast("B")):
        has_meta = True
        if inner == 1:
            yield _meta_tensor(payload)
        elif inner == 2:  # VersionDef; repeated occurrences merge, as protobuf's do
            versions += payload
    if not has_meta:
        raise DecodeError("the table's first entry holds no meta")
    version = versions_pb2.VersionDef()
    try:
        version.ParseFromString(bytes(versions))
    except Exception as exc:
        raise DecodeError(f"bad SavedTensorSlices meta: {exc}") from None
    if version.min_consumer > CHECKPOINT_VERSION or CHECKPOINT_VERSION in version.bad_consumers:
        raise DecodeError(f"checkpoint needs a newer reader (min_consumer {version.min_consumer})")


def _meta_fields(view: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(0, empty) for each ``meta`` of a ``SavedTensorSlices``, then (field, payload) of each
    length-delimited field of it."""
    try:
        for number, wire, start, end in iter_fields(view):
            if number != 1 or wire != WIRE_LEN:
                continue  # SavedTensorSlices.data, or an unknown field
            yield 0, view[:0]
            for inner, inner_wire, a, b in iter_fields(view[start:end]):
                if inner_wire == WIRE_LEN:
                    yield inner, view[start + a : start + b]
    except DecodeError as exc:
        raise DecodeError(f"bad SavedTensorSlices meta: {exc}") from None


def _meta_tensor(data: memoryview) -> MetaTensor:
    entry = saved_tensor_slice_pb2.SavedSliceMeta()
    try:
        entry.ParseFromString(bytes(data))
    except Exception as exc:
        raise DecodeError(f"bad SavedTensorSlices meta: {exc}") from None
    if entry.shape.unknown_rank or len(entry.shape.dim) > MAX_RANK:
        raise DecodeError(f"tensor {entry.name!r}: bad shape")
    shape = tuple(int(d.size) for d in entry.shape.dim)
    if any(d < 0 for d in shape):
        raise DecodeError(f"tensor {entry.name!r}: negative dimension in {shape}")
    if not numpy_can_shape(shape):
        raise DecodeError(f"tensor {entry.name!r}: shape {list(shape)} is too big for NumPy")
    slices = tuple(_slice_from_proto(s) for s in entry.slice)
    if not slices:
        raise DecodeError(f"tensor {entry.name!r} lists no slice")
    for extents in slices:
        check_extents(extents, shape)
    return MetaTensor(entry.name.encode("utf-8"), int(entry.type), shape, slices)


# -- streaming table writer ---------------------------------------------------------------


class _Block:
    """A table block whose values are kept as buffers (large ones are not copied)."""

    def __init__(self, restart_interval: int) -> None:
        self._interval = restart_interval
        self._parts: list[Buffer] = []
        self._small = bytearray()
        self._size = 0
        self._restarts = [0]
        self._counter = 0
        self._last_key = b""

    def add(self, key: bytes, value: Sequence[Buffer]) -> None:
        shared = 0
        if self._counter < self._interval:
            last = self._last_key
            limit = min(len(last), len(key))
            while shared < limit and last[shared] == key[shared]:
                shared += 1
        else:
            self._restarts.append(self._size)
            self._counter = 0
        sizes = [memoryview(p).nbytes for p in value]
        head = (
            encode_varint(shared)
            + encode_varint(len(key) - shared)
            + encode_varint(sum(sizes))
            + key[shared:]
        )
        self._append(head, len(head))
        for part, size in zip(value, sizes, strict=True):
            self._append(part, size)
        self._last_key = key
        self._counter += 1

    def _append(self, part: Buffer, size: int) -> None:
        if size < _SMALL:
            self._small += part
        else:
            if self._small:
                self._parts.append(bytes(self._small))
                self._small = bytearray()
            self._parts.append(part)
        self._size += size

    def size_estimate(self) -> int:
        return self._size + 4 * len(self._restarts) + 4

    def empty(self) -> bool:
        return self._size == 0

    def finish(self) -> tuple[list[Buffer], int]:
        """The block's contents as buffers, and their total size; resets the builder."""
        for r in self._restarts:
            self._small += _U32.pack(r)
        self._small += _U32.pack(len(self._restarts))
        parts = [*self._parts, bytes(self._small)]
        size = self._size + 4 * len(self._restarts) + 4
        self.__init__(self._interval)  # type: ignore[misc]
        return parts, size


class TableWriter:
    """Builds a table from keys in strictly increasing order, handing out the bytes as it goes.

    ``add`` and ``finish`` return the buffers to append to the file, in order (large values
    are the caller's own buffers, not copies). The bytes are those of
    :class:`.table.TableBuilder` for the same entries.
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self._block_size = block_size
        self._offset = 0
        self._data = _Block(BLOCK_RESTART_INTERVAL)
        self._index = _Block(1)
        self._last_key: bytes | None = None
        self._pending: BlockHandle | None = None

    @property
    def offset(self) -> int:
        """Bytes handed out so far."""
        return self._offset

    def add(self, key: bytes, value: Sequence[Buffer]) -> list[Buffer]:
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"table keys must strictly increase: {key!r} after {self._last_key!r}")
        if self._pending is not None:
            assert self._last_key is not None
            sep = shortest_separator(self._last_key, key)
            self._index.add(sep, [self._pending.encode()])
            self._pending = None
        self._last_key = key
        self._data.add(key, value)
        if self._data.size_estimate() >= self._block_size:
            return self._flush()
        return []

    def _flush(self) -> list[Buffer]:
        if self._data.empty():
            return []
        parts, size = self._data.finish()
        out = self._emit(parts, size)
        self._pending = BlockHandle(self._offset - size - BLOCK_TRAILER_SIZE, size)
        return out

    def _emit(self, parts: list[Buffer], size: int) -> list[Buffer]:
        crc = 0
        for part in parts:
            crc = crc32c(part, crc)
        type_byte = bytes([NO_COMPRESSION])
        trailer = type_byte + _U32.pack(mask(crc32c(type_byte, crc)))
        self._offset += size + BLOCK_TRAILER_SIZE
        return [*parts, trailer]

    def finish(self) -> list[Buffer]:
        """The remaining blocks, the metaindex and index blocks, and the footer."""
        out = self._flush()
        metaindex = BlockHandle(self._offset, 8)
        out += self._emit(*_Block(BLOCK_RESTART_INTERVAL).finish())
        if self._pending is not None:
            assert self._last_key is not None
            self._index.add(short_successor(self._last_key), [self._pending.encode()])
            self._pending = None
        parts, size = self._index.finish()
        index = BlockHandle(self._offset, size)
        out += self._emit(parts, size)
        footer = bytearray(metaindex.encode() + index.encode())
        footer += bytes(FOOTER_SIZE - 8 - len(footer))
        footer += struct.pack("<Q", MAGIC)
        out.append(bytes(footer))
        self._offset += FOOTER_SIZE
        return out


# -- reading a table block by block -------------------------------------------------------


def decode_footer(footer: Buffer) -> BlockHandle:
    """The index block's handle, from the last 48 bytes of a table."""
    view = memoryview(footer)
    if view.nbytes != FOOTER_SIZE:
        raise DecodeError(f"table footer must be {FOOTER_SIZE} bytes")
    (magic,) = struct.unpack_from("<Q", view, FOOTER_SIZE - 8)
    if magic != MAGIC:
        raise DecodeError(f"bad table magic number {magic:#018x} (expected {MAGIC:#018x})")
    _, pos = BlockHandle.decode(bytes(view), 0, FOOTER_SIZE - 8)
    index, _ = BlockHandle.decode(bytes(view), pos, FOOTER_SIZE - 8)
    return index


def check_handle(handle: BlockHandle, file_size: int, what: str) -> None:
    """Raise DecodeError unless the block (and its trailer) lies before the footer."""
    if (
        handle.size < 4
        or handle.offset + handle.size + BLOCK_TRAILER_SIZE > file_size - FOOTER_SIZE
    ):
        raise DecodeError(
            f"{what} block (offset {handle.offset}, size {handle.size}) lies outside the file "
            f"({file_size} bytes)"
        )


def check_block(raw: Buffer, offset: int, *, verify: bool = True) -> memoryview:
    """The contents of a block read with its 5-byte trailer, its checksum checked."""
    view = memoryview(raw).cast("B")
    if len(view) < BLOCK_TRAILER_SIZE:
        raise DecodeError(f"block at offset {offset}: {len(view)} bytes, shorter than its trailer")
    contents = view[: len(view) - BLOCK_TRAILER_SIZE]
    type_byte = view[len(contents)]
    if verify:
        (stored,) = _U32.unpack_from(view, len(contents) + 1)
        actual = mask(crc32c(bytes([type_byte]), crc32c(contents)))
        if stored != actual:
            raise DecodeError(
                f"block at offset {offset}: checksum mismatch "
                f"(stored {stored:#010x}, computed {actual:#010x})"
            )
    if type_byte != NO_COMPRESSION:
        raise DecodeError(f"block at offset {offset}: compression type {type_byte} unsupported")
    return contents


def block_entries(block: memoryview) -> list[tuple[bytes, memoryview]]:
    """(key, value) of every entry of a block's contents; values are views, not copies. Keys
    may expand to at most :func:`~.table.key_budget` of the block's size (a crafted restart
    run of long shared prefixes is refused)."""
    size = len(block)
    left = limit = key_budget(size)
    if size < 4:
        raise DecodeError("block too short")
    (num_restarts,) = _U32.unpack_from(block, size - 4)
    restarts_start = size - 4 - 4 * num_restarts
    if num_restarts == 0 or restarts_start < 0:
        raise DecodeError(f"bad restart count {num_restarts}")
    out: list[tuple[bytes, memoryview]] = []
    pos = 0
    key = b""
    while pos < restarts_start:
        shared, pos = decode_varint(block, pos, restarts_start)
        non_shared, pos = decode_varint(block, pos, restarts_start)
        value_len, pos = decode_varint(block, pos, restarts_start)
        if shared > len(key) or pos + non_shared + value_len > restarts_start:
            raise DecodeError(f"corrupt block entry at offset {pos}")
        left -= shared + non_shared
        if left < 0:
            raise key_bomb(limit)
        key = key[:shared] + bytes(block[pos : pos + non_shared])
        pos += non_shared
        if out and key <= out[-1][0]:
            raise DecodeError(f"table keys out of order: {key!r} after {out[-1][0]!r}")
        out.append((key, block[pos : pos + value_len]))
        pos += value_len
    return out


def first_entry_header(prefix: Buffer) -> tuple[bytes, int, int]:
    """(key, value length, value offset) of a block's first entry, from its first bytes."""
    view = memoryview(prefix)
    shared, pos = decode_varint(view, 0)
    non_shared, pos = decode_varint(view, pos)
    value_len, pos = decode_varint(view, pos)
    if shared:
        raise DecodeError("a block's first entry shares a key prefix")
    if pos + non_shared > len(view):
        raise DecodeError("truncated first entry")
    return bytes(view[pos : pos + non_shared]), value_len, pos + non_shared


def find_block(separators: Sequence[bytes], key: bytes) -> int | None:
    """Index of the block that would hold ``key`` (each block's separator is >= its keys)."""
    i = bisect.bisect_left(separators, key)
    return i if i < len(separators) else None

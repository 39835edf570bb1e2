"""A V1 table's meta, keys and entry values for many whole tensors at once, column-wise.

The same bytes as :func:`.v1.encode_meta`, :func:`.ordered_code.encode_tensor_name_slice`
and :func:`.v1.encode_slice_entry` for tensors each stored whole, made with a few NumPy calls
per chunk of tensors instead of Python (and protobuf message objects) per tensor.

Everything an entry holds besides its name and its data depends only on the tensor's (dtype,
shape) pair, its *kind*: a save of many tensors has few. :class:`Kinds` holds, per kind, the
bytes of a slice key after the name, of a ``SavedSliceMeta`` after the name, and of a data
entry between the name and the data; a tensor's record is then its name's fields, its kind's
bytes and (in a data entry) its data, laid out by :func:`.packed.interleave`.

A kind is *direct* when its data is the tensor's bytes as they are (a fixed-width field:
float, double, complex, of a plain little-endian NumPy dtype; or bool); the values of other
tensors (varint fields, strings, big-endian arrays) are encoded one by one with
:func:`.v1.encode_slice_entry` and placed whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import numpy as np

from .._proto import saved_tensor_slice_pb2
from .ordered_code import write_num_increasing
from .packed import Column, PackedBytes, interleave, varint_column, varint_lengths
from .v1 import (
    CHECKPOINT_VERSION,
    TENSOR_FIELDS,
    WIRE_LEN,
    encode_slice_proto,
    len_field,
    whole,
    wire_tag,
)
from .varint import encode_varint

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: ``SavedTensorSliceMeta.versions`` as written after the tensors (field 2, producer 1).
META_TAIL = len_field(2, wire_tag(1, 0) + encode_varint(CHECKPOINT_VERSION))
#: Tensors laid out per :func:`meta_pieces` piece.
META_CHUNK = 1 << 14


def _blob(items: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``items`` back to back (uint8), each one's start and length (int32: gathered per
    tensor, 4 bytes each)."""
    lengths = np.array([len(b) for b in items], dtype=np.int32)
    starts = np.zeros(len(items), dtype=np.int32)
    np.cumsum(lengths[:-1], out=starts[1:])
    return np.frombuffer(b"".join(items), dtype=np.uint8), starts, lengths


def _meta_suffix(enum: int, shape: tuple[int, ...]) -> bytes:
    """A whole tensor's ``SavedSliceMeta`` without its name (field 1, serialized first)."""
    entry = saved_tensor_slice_pb2.SavedSliceMeta()
    entry.shape.SetInParent()
    for dim in shape:
        entry.shape.dim.add(size=dim)
    entry.type = enum  # type: ignore[assignment]
    entry.slice.add().ParseFromString(encode_slice_proto(whole(len(shape))))
    return bytes(entry.SerializeToString(deterministic=True))


def key_tail(rank: int) -> bytes:
    """A whole tensor's slice key after its name: the end of the OrderedCode string, the
    rank and (0, -1) per dimension."""
    return b"\x00\x01" + write_num_increasing(rank) + b"\x80\x7f" * rank


@dataclass
class Kinds:
    """Per distinct (TF dtype number, shape, direct) kind, the bytes its tensors share."""

    direct: np.ndarray  # bool: the data is the tensor's bytes as they are
    payload: np.ndarray  # int64: bytes of data of a direct kind
    key_tails: tuple[np.ndarray, np.ndarray, np.ndarray]  # blob, starts, lengths
    meta_suffixes: tuple[np.ndarray, np.ndarray, np.ndarray]
    value_mids: tuple[np.ndarray, np.ndarray, np.ndarray]  # direct kinds only (else empty)

    @classmethod
    def of(cls, kinds: Sequence[tuple[int, tuple[int, ...], bool]]) -> Kinds:
        """``kinds``: (TF dtype number, shape, whether its arrays' bytes are stored as
        they are: a plain little-endian NumPy dtype of a fixed-width field, or bool)."""
        direct, payload, tails, suffixes, mids = [], [], [], [], []
        for enum, shape, plain in kinds:
            field = TENSOR_FIELDS[enum]
            size = int(np.prod(shape, dtype=np.int64))
            is_direct = plain and (field.kind == "fixed" or enum == 10)
            nbytes = size * (np.dtype(_ITEMSIZE[enum]).itemsize if is_direct else 0)
            mid = b""
            if is_direct:
                tensor = wire_tag(field.number, WIRE_LEN) + encode_varint(nbytes) if nbytes else b""
                mid = (
                    len_field(2, encode_slice_proto(whole(len(shape))))
                    + wire_tag(3, WIRE_LEN)
                    + encode_varint(len(tensor) + nbytes)
                    + tensor
                )
            direct.append(is_direct)
            payload.append(nbytes)
            tails.append(key_tail(len(shape)))
            suffixes.append(_meta_suffix(enum, shape))
            mids.append(mid)
        return cls(
            np.array(direct, dtype=bool),
            np.array(payload, dtype=np.int64),
            _blob(tails),
            _blob(suffixes),
            _blob(mids),
        )

    def column(self, which: tuple[np.ndarray, np.ndarray, np.ndarray], ids: np.ndarray) -> Column:
        """The bytes of ``which`` (one of the blobs) of each of these kind ids."""
        blob, starts, lengths = which
        return Column(blob, starts[ids], lengths[ids])


#: Item size of each dtype a direct kind can have (bool: one byte an element).
_ITEMSIZE = {1: "f4", 2: "f8", 8: "c8", 18: "c16", 10: "u1"}


def has_escapes(names: PackedBytes) -> bool:
    """Whether a name holds a 0x00 or 0xFF byte (escaped in a slice key's OrderedCode)."""
    data = np.frombuffer(names.data, dtype=np.uint8)
    return bool(len(data)) and bool(np.count_nonzero(data == 0) or np.count_nonzero(data == 0xFF))


class SliceKeys(Sequence[bytes]):
    """The slice keys of whole tensors named ``names`` (bytewise increasing, none with a
    0x00 or 0xFF byte: see :func:`has_escapes`) of these kinds, in the same (increasing)
    order, made on access: :meth:`part` makes a range of them packed (a range of a table at
    a time: no bytes object per key, nor a buffer of them all, ever exists)."""

    __slots__ = ("increasing", "kind_ids", "kinds", "names")

    def __init__(self, names: PackedBytes, kinds: Kinds, kind_ids: np.ndarray) -> None:
        self.names = names
        self.kinds = kinds
        self.kind_ids = kind_ids
        self.increasing = names.increasing or len(names) < 2

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            low, high, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(low, high, step)]
            return list(self.part(low, high)) if low < high else []
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("index out of range")
        blob, starts, lengths = self.kinds.key_tails
        kind = int(self.kind_ids[index])
        tail = blob[int(starts[kind]) : int(starts[kind]) + int(lengths[kind])].tobytes()
        return b"\x00" + self.names[index] + tail

    def part(self, low: int, high: int) -> PackedBytes:
        """Keys ``low:high``, packed."""
        count = max(0, high - low)
        names = self.names
        lead = Column(
            _ZERO, np.broadcast_to(np.int32(0), (count,)), np.broadcast_to(np.uint8(1), (count,))
        )
        name_column = Column(
            np.frombuffer(names.data, dtype=np.uint8),
            names.starts[low:high],
            names.lengths[low:high],
        )
        tails = self.kinds.column(self.kinds.key_tails, self.kind_ids[low:high])
        keys = interleave([lead, name_column, tails])
        return PackedBytes(keys.data.tobytes(), keys.starts, keys.lengths, increasing=True)


_ZERO = np.zeros(1, np.uint8)


def _name_columns(names: Column, omit_empty: bool) -> list[Column]:
    """A ``string`` field 1 of these names: its tag and length, then the name."""
    return [varint_column(names.lengths, tag=0x0A, omit_zero=omit_empty), names]


def _meta_records(names: Column, kinds: Kinds, kind_ids: np.ndarray) -> np.ndarray:
    """Bytes of each tensor's ``SavedSliceMeta`` (without its tag and length)."""
    n = names.lengths.astype(np.int64)
    record: np.ndarray = np.where(n > 0, 1 + varint_lengths(n) + n, 0)
    record += kinds.meta_suffixes[2][kind_ids]
    return record


def meta_inner_size(
    names: Callable[[int, int], Column], count: int, kinds: Kinds, kind_ids: np.ndarray
) -> int:
    """Bytes of the ``SavedTensorSliceMeta`` of these tensors (see :func:`meta_pieces`)."""
    inner = len(META_TAIL)
    for low in range(0, count, META_CHUNK):
        high = min(count, low + META_CHUNK)
        record = _meta_records(names(low, high), kinds, kind_ids[low:high])
        inner += int((1 + varint_lengths(record) + record).sum())
    return inner


def meta_head(inner: int) -> bytes:
    """The start of the meta value: ``SavedTensorSlices.meta``'s tag and length."""
    return wire_tag(1, WIRE_LEN) + encode_varint(inner)


def meta_pieces(
    names: Callable[[int, int], Column], count: int, kinds: Kinds, kind_ids: np.ndarray
) -> Iterator[Buffer]:
    """The value of key ``""`` (``SavedTensorSlices{meta}``) for ``count`` whole tensors in
    key order (``names(low, high)``: the names of tensors ``low:high`` as a column), in
    pieces (views of the records of :data:`META_CHUNK` tensors at a time): what
    :func:`.v1.encode_meta` returns for the same tensors, joined (its size:
    :func:`meta_inner_size`, :func:`meta_head`)."""
    yield meta_head(meta_inner_size(names, count, kinds, kind_ids))
    for low in range(0, count, META_CHUNK):
        high = min(count, low + META_CHUNK)
        ids = kind_ids[low:high]
        column = names(low, high)
        record = _meta_records(column, kinds, ids)
        suffix = kinds.column(kinds.meta_suffixes, ids)
        laid = interleave([varint_column(record, tag=0x0A), *_name_columns(column, True), suffix])
        yield memoryview(laid.data)  # type: ignore[arg-type]  # (a uint8 array: no bytes copy)
    yield META_TAIL


def entry_values(
    names: Column,
    kinds: Kinds,
    kind_ids: np.ndarray,
    data: np.ndarray,
    others: dict[int, bytes],
    *,
    first: bytes | None = None,
    direct: np.ndarray | None = None,
) -> Column:
    """The data entries' values (``SavedTensorSlices{data}``) of whole tensors: ``names``,
    their kinds, ``data`` (uint8: the bytes of the direct ones, back to back, in order) and
    ``others`` (by position: the whole value of each tensor not of a direct kind).
    ``first``: a value placed before them (the meta, when it shares the first block);
    ``direct``: the entries whose data is in ``data`` (default: those of direct kinds; an
    entry of a direct kind left out, and not in ``others``, gets an empty value)."""
    count = len(kind_ids)
    if direct is None:
        direct = kinds.direct[kind_ids]
    n = names.lengths.astype(np.int64) * direct
    mids, mid_starts, mid_lengths = kinds.value_mids
    mid = Column(mids, mid_starts[kind_ids], mid_lengths[kind_ids] * direct)
    payload = kinds.payload[kind_ids] * direct
    outer = 1 + varint_lengths(n) + n + mid.lengths + payload
    heads = [varint_column(outer, tag=0x12), varint_column(n, tag=0x0A)]
    for column in heads:
        column.lengths[~direct] = 0
    data_starts = np.zeros(count, dtype=np.int64)
    np.cumsum(payload[:-1], out=data_starts[1:])
    other_lengths = np.zeros(count, dtype=np.int64)
    other_starts = np.zeros(count, dtype=np.int64)
    blob = b""
    if others:
        where = np.array(sorted(others), dtype=np.int64)
        values = [others[i] for i in where.tolist()]
        other_lengths[where] = [len(v) for v in values]
        np.cumsum(other_lengths[:-1], out=other_starts[1:])
        blob = b"".join(values)
    return interleave(
        [
            *heads,
            Column(names.data, names.starts, n),
            mid,
            Column(data, data_starts, payload),
            Column(np.frombuffer(blob, dtype=np.uint8), other_starts, other_lengths),
        ],
        first=first,
    )

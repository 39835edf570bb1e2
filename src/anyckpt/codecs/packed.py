"""Many small records encoded at once, column by column, with NumPy.

A checkpoint index holds one record per tensor, and each record is a handful of short fields
(varints, a fixed32, a key suffix). Encoding 10,000 of them one by one in Python costs more
than writing the tensors; encoding each *field* for all records at once costs a few NumPy
calls. A :class:`Column` is one field of every record: a source buffer and, per record, where
its bytes start and how many there are (0: the field is absent from that record).
:func:`interleave` then lays the records out one after the other, field by field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import NamedTuple, overload

import numpy as np

#: Records laid out per :func:`interleave` pass: bounds its temporary index arrays.
_CHUNK_RECORDS = 1 << 12


class Column(NamedTuple):
    """One field of ``n`` records: record ``i`` is ``data[starts[i] : starts[i] + lengths[i]]``."""

    data: np.ndarray  # uint8
    starts: np.ndarray  # int32 where the data fits (int64 beyond 2 GiB)
    lengths: np.ndarray  # int32 or narrower (int64 for a bytes column past 2 GiB)

    def __len__(self) -> int:
        return len(self.starts)

    def item(self, i: int) -> bytes:
        start = int(self.starts[i])
        return self.data[start : start + int(self.lengths[i])].tobytes()


def _starts(lengths: np.ndarray, total: int | None = None) -> np.ndarray:
    """Where each of records of these ``lengths`` starts, back to back: int32 when ``total``
    (their sum, if known) fits, else int64."""
    narrow = total is not None and total < 2**31
    starts = np.zeros(len(lengths), dtype=np.int32 if narrow else np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _strided(count: int, stride: int) -> np.ndarray:
    """``0, stride, 2 * stride...``: the starts of fixed-width records (int32 when they fit)."""
    dtype = np.int32 if count * stride < 2**31 else np.int64
    return np.arange(0, count * stride, stride, dtype=dtype)


def bytes_column(items: Sequence[bytes]) -> Column:
    """A column of arbitrary byte strings (joined a chunk at a time: ``bytes.join`` holds an
    80-byte buffer record per item while it runs)."""
    if isinstance(items, PackedBytes):
        return items.column()
    count = len(items)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=count)
    total = int(lengths.sum())
    if total < 2**31:  # 4 bytes a record, not 8 (each)
        lengths = lengths.astype(np.int32)
    starts = _starts(lengths, total)
    if count <= _CHUNK_RECORDS:
        return Column(np.frombuffer(b"".join(items), dtype=np.uint8), starts, lengths)
    data = np.empty(total, dtype=np.uint8)
    for first in range(0, count, _CHUNK_RECORDS):
        piece = b"".join(items[first : first + _CHUNK_RECORDS])
        at = int(starts[first])
        data[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
    return Column(data, starts, lengths)


class PackedBytes(Sequence[bytes]):
    """Byte strings kept back to back in one ``bytes`` object with, per string, where it
    starts and its length (int32 where they fit): a sequence of ``bytes`` without an object
    per string (~45 bytes each for short names, plus 8 for a list's reference), made on
    access. ``increasing``: known to be in strictly increasing bytewise order (the names of
    a mapping, sorted)."""

    __slots__ = ("data", "increasing", "lengths", "starts")

    def __init__(
        self, data: bytes, starts: np.ndarray, lengths: np.ndarray, *, increasing: bool = False
    ) -> None:
        self.data = data
        self.starts = starts
        self.lengths = lengths
        self.increasing = increasing

    @classmethod
    def join(cls, items: Iterable[bytes], count: int, *, increasing: bool = False) -> PackedBytes:
        """``count`` byte strings packed (joined a chunk at a time: ``bytes.join`` holds an
        80-byte buffer record per item while it runs)."""
        iterator = iter(items)
        pieces: list[bytes] = []
        lengths = np.empty(count, dtype=np.int64)
        for first in range(0, count, _CHUNK_RECORDS):
            chunk = [next(iterator) for _ in range(min(_CHUNK_RECORDS, count - first))]
            lengths[first : first + len(chunk)] = list(map(len, chunk))
            pieces.append(b"".join(chunk))
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        del pieces
        if len(data) < 2**31:
            lengths = lengths.astype(np.int32)
        return cls(data, _starts(lengths, len(data)), lengths, increasing=increasing)

    @classmethod
    def from_rows(
        cls,
        rows: np.ndarray,
        order: np.ndarray,
        lengths: np.ndarray,
        *,
        increasing: bool = False,
    ) -> PackedBytes:
        """The first ``lengths[i]`` bytes of row ``order[i]`` of the uint8 matrix ``rows``,
        for each i (gathered a chunk of rows at a time: no full-size mask or sorted copy)."""
        return cls.from_pieces(row_pieces(rows, order, lengths), lengths, increasing=increasing)

    @classmethod
    def from_pieces(
        cls, pieces: list[bytes], lengths: np.ndarray, *, increasing: bool = False
    ) -> PackedBytes:
        """Strings of these ``lengths`` from their bytes back to back in ``pieces`` (which
        is emptied: the pieces are freed as soon as they are joined)."""
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        wide = len(data) >= 2**31
        lengths = lengths.astype(np.int64 if wide else np.int32, copy=False)
        return cls(data, _starts(lengths, len(data)), lengths, increasing=increasing)

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return list(self._items(start, stop))
            return [self[i] for i in range(start, stop, step)]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("index out of range")
        start = int(self.starts[index])
        return self.data[start : start + int(self.lengths[index])]

    def _items(self, start: int, stop: int) -> Iterator[bytes]:
        data = self.data
        for first in range(start, stop, _CHUNK_RECORDS):
            last = min(stop, first + _CHUNK_RECORDS)
            starts = self.starts[first:last]
            ends = (starts + self.lengths[first:last]).tolist()
            yield from map(data.__getitem__, map(slice, starts.tolist(), ends))

    def __iter__(self) -> Iterator[bytes]:
        return self._items(0, len(self))

    def part(self, low: int, high: int) -> PackedBytes:
        """Strings ``low:high`` as packed bytes sharing this buffer (views of the starts and
        lengths: no copy), ``increasing`` kept."""
        return PackedBytes(
            self.data, self.starts[low:high], self.lengths[low:high], increasing=self.increasing
        )

    def with_first(self, item: bytes) -> PackedBytes:
        """These strings after ``item`` (new starts and lengths; the data copied only if
        ``item`` is not empty), ``increasing`` kept when ``item`` sorts before them all."""
        count = len(self) + 1
        data = self.data if not item else item + self.data
        wide = len(data) >= 2**31
        starts = np.zeros(count, dtype=np.int64 if wide else np.int32)
        starts[1:] = self.starts
        starts[1:] += len(item)
        lengths = np.empty(count, dtype=np.int64 if wide else np.int32)
        lengths[0] = len(item)
        lengths[1:] = self.lengths
        first = self[0] if len(self) else None
        increasing = self.increasing and (first is None or item < first)
        return PackedBytes(data, starts, lengths, increasing=increasing)

    def column(self) -> Column:
        """The strings as a :class:`Column` (its starts a copy: callers may move them)."""
        return Column(np.frombuffer(self.data, dtype=np.uint8), self.starts.copy(), self.lengths)


class HeadedBytes(Sequence[bytes]):
    """``first``, then the strings of ``rest``: :meth:`PackedBytes.with_first` without its
    copies of every start and length (8 bytes a string); :meth:`part` makes a range of them
    packed (a range's starts and lengths, the buffer shared unless the range holds a
    non-empty ``first``)."""

    __slots__ = ("first", "increasing", "rest")

    def __init__(self, first: bytes, rest: PackedBytes) -> None:
        self.first = first
        self.rest = rest
        self.increasing = rest.increasing and (not len(rest) or first < rest[0])

    def __len__(self) -> int:
        return len(self.rest) + 1

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index == 0:
            return self.first
        if not 0 < index < len(self):
            raise IndexError("index out of range")
        return self.rest[index - 1]

    def part(self, low: int, high: int) -> PackedBytes:
        """Strings ``low:high`` as packed bytes."""
        if low > 0 or high <= 0:
            return self.rest.part(max(low - 1, 0), max(high - 1, 0))
        head = self.rest.part(0, high - 1)
        if not self.first:  # the buffer shared
            return head.with_first(self.first)
        return PackedBytes.join(chain([self.first], head), high, increasing=self.increasing)


def row_pieces(rows: np.ndarray, order: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """The first ``lengths[i]`` bytes of row ``order[i]`` of the uint8 matrix ``rows``, for
    each i, back to back in pieces of a chunk of rows each (no full-size mask or sorted
    copy); for :meth:`PackedBytes.from_pieces` once the caller has let go of ``rows``."""
    width = rows.shape[1]
    columns = np.arange(width, dtype=np.int32)
    pieces: list[bytes] = []
    for first in range(0, len(order), _CHUNK_RECORDS):
        chunk = order[first : first + _CHUNK_RECORDS]
        keep = columns < lengths[first : first + len(chunk), None]
        pieces.append(rows[chunk][keep].tobytes())
    return pieces


def _as_uint64(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as uint64 (int64 ones viewed, not copied)."""
    if values.dtype == np.int64:
        return values.view(np.uint64)
    return values.astype(np.uint64, copy=False)


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each value's unsigned LEB128 varint (1 for 0), as uint8."""
    v = _as_uint64(values)
    n = np.ones(len(v), dtype=np.uint8)
    top = int(v.max()) if len(v) else 0
    for bits in range(7, top.bit_length(), 7):  # only as many passes as the largest needs
        n += v >= np.uint64(1 << bits)
    return n


def varint_column(values: np.ndarray, *, tag: int | None = None, omit_zero: bool = False) -> Column:
    """Unsigned varints of ``values`` (non-negative, < 2**64), each after a one-byte ``tag`` if
    given (a protobuf field key); ``omit_zero`` leaves zeros out entirely (proto3 defaults)."""
    v = _as_uint64(np.asarray(values))
    count = len(v)
    if omit_zero and not v.any():  # every field left out (one data file's shard ids)
        return _absent(count)
    nbytes = varint_lengths(v)
    width = int(nbytes.max(initial=1))
    lead = 0 if tag is None else 1
    out = np.empty((count, lead + width), dtype=np.uint8)
    if tag is not None:
        out[:, 0] = tag
    for j in range(width):
        byte = ((v >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(nbytes > j + 1, np.uint8(0x80), np.uint8(0))
        out[:, lead + j] = byte  # bytes past a value's length are never read
    lengths = nbytes  # (its own array: changed in place)
    lengths += lead
    if omit_zero:
        lengths[v == 0] = 0
    return Column(out.reshape(-1), _strided(count, lead + width), lengths)


def _absent(count: int) -> Column:
    """A column whose field every record leaves out (no memory per record)."""
    return Column(
        np.zeros(0, dtype=np.uint8),
        np.broadcast_to(np.int32(0), (count,)),
        np.broadcast_to(np.uint8(0), (count,)),
    )


def fixed32_column(values: np.ndarray, *, tag: int, omit_zero: bool = False) -> Column:
    """Little-endian uint32s after a one-byte ``tag``; ``omit_zero`` leaves zeros out."""
    v = np.asarray(values).astype("<u4", copy=False)
    count = len(v)
    out = np.empty((count, 5), dtype=np.uint8)
    out[:, 0] = tag
    out[:, 1:] = v.view(np.uint8).reshape(count, 4)
    lengths = np.full(count, 5, dtype=np.uint8)
    if omit_zero:
        lengths[v == 0] = 0
    return Column(out.reshape(-1), _strided(count, 5), lengths)


def interleave(columns: Sequence[Column], *, first: bytes | None = None) -> Column:
    """The records, one after another, each the concatenation of its fields in column order.

    Returns a column whose record ``i`` is that concatenation (its bytes are contiguous and
    records follow each other, so ``data`` is the whole encoding). The work runs a chunk of
    records at a time, from the bytes those records read of each column: its index arrays
    (8 bytes per output byte) and sources stay small, whatever the number of records.
    ``first``, if given, is one more record placed before them all (as it is: the header
    entry of an index, without copying every column to make room for it)."""
    count = len(columns[0])
    if any(len(c) != count for c in columns):
        raise ValueError("columns of different lengths")
    lead = 0 if first is None else 1
    record_lengths = np.zeros(lead + count, dtype=np.int32)  # (a record is far below 2 GiB)
    for column in columns:
        record_lengths[lead:] += column.lengths
    if first is not None:
        record_lengths[0] = len(first)
    total = int(record_lengths.sum(dtype=np.int64))
    out = np.empty(total, dtype=np.uint8)
    at = 0
    if first is not None:
        out[: len(first)] = np.frombuffer(first, dtype=np.uint8)
        at = len(first)
    for low in range(0, count, _CHUNK_RECORDS):
        high = min(count, low + _CHUNK_RECORDS)
        at += _gather_chunk(columns, low, high, out[at:])
    return Column(out, _starts(record_lengths, total), record_lengths)  # int32 where they fit


def _chunk_source(column: Column, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """The bytes that records ``first:last`` read of ``column``, as one piece, and where each
    record's field starts in it: the span of ``data`` they cover (a slice, no copy) when it is
    not much more than the bytes read (fields in order: the usual case), else those bytes
    gathered."""
    starts = column.starts[first:last]
    lengths = column.lengths[first:last]
    total = int(lengths.sum())
    if total == 0:
        return column.data[:0], np.zeros(len(starts), dtype=np.int64)
    ends = starts + lengths
    low, high = int(starts.min()), int(ends.max())
    if high - low <= 4 * total + 4096:
        return column.data[low:high], starts - low
    placed = _starts(lengths)
    index = np.repeat(starts - placed, lengths)
    index += np.arange(total, dtype=np.int64)
    return column.data[index], placed


def _gather_chunk(columns: Sequence[Column], first: int, last: int, out: np.ndarray) -> int:
    """Lay records ``first:last`` out at the start of ``out``; return the bytes written."""
    fields = len(columns)
    lengths = np.empty((last - first, fields), dtype=np.int64)  # (records, fields)
    starts = np.empty((last - first, fields), dtype=np.int64)
    pieces: list[np.ndarray] = []
    base = 0
    for j, column in enumerate(columns):
        piece, piece_starts = _chunk_source(column, first, last)
        lengths[:, j] = column.lengths[first:last]
        np.add(piece_starts, base, out=starts[:, j])
        pieces.append(piece)
        base += len(piece)
    source = np.concatenate(pieces)
    seg_lengths = lengths.reshape(-1)
    total = int(seg_lengths.sum())
    # Output byte j of a segment s comes from source[starts[s] + j - placed[s]]: one gather.
    starts_flat = starts.reshape(-1)
    starts_flat -= _starts(seg_lengths)
    gather = np.repeat(starts_flat, seg_lengths)
    gather += np.arange(total, dtype=np.int64)
    np.take(source, gather, out=out[:total])
    return total

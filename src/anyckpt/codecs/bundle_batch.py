"""Decoding the ``BundleEntryProto`` values of a whole V2 index at once, with NumPy.

An index of many small tensors holds thousands of entries that differ only in their offset and
checksum: the dtype and shape fields (the "head") repeat, and the rest is ``[0x18 shard_id]
[0x20 offset] [0x28 size] [0x35 crc32c]``, each field left out when zero. :func:`decode_batch`
finds the distinct heads (decoded once each) and parses those fields of every entry as columns;
an entry in any other form (partitioned tensors, unknown fields, another field order, numbers
out of range, damage) is decoded on its own by :func:`~anyckpt.codecs.bundle.decode_entry`, so
the results and the errors are exactly those of ``decode_entry`` entry by entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from .bundle import (
    DECODED_HEADS,
    INT32_MAX,
    EntryRecord,
    NotCanonical,
    decode_entry_fast,
    decode_record,
)

#: Longest varint decoded with NumPy: 9 bytes hold 63 bits, so every value is an int64.
_MAX_VARINT = 9
_SHIFTS = (7 * np.arange(_MAX_VARINT, dtype=np.uint64)).astype(np.uint64)


@dataclass
class EntryColumns:
    """Decoded entries as columns: no Python object per entry. Entry ``i`` decoded with
    others has ``head_ids[i] >= 0`` (its dtype and shape are ``heads[head_ids[i]]``); one
    decoded on its own (``head_ids[i] == -1``) is ``alone[i]``."""

    #: The distinct (dtype, shape) heads of the entries decoded together.
    heads: list[tuple[int, tuple[int, ...]]]
    head_ids: np.ndarray
    shard_ids: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    crcs: np.ndarray
    alone: dict[int, EntryRecord]

    def __len__(self) -> int:
        return len(self.head_ids)

    def record(self, i: int) -> EntryRecord:
        """Entry ``i`` as an :class:`EntryRecord`."""
        head = int(self.head_ids[i])
        if head < 0:
            return self.alone[i]
        dtype, shape = self.heads[head]
        return EntryRecord(
            dtype,
            shape,
            int(self.shard_ids[i]),
            int(self.offsets[i]),
            int(self.sizes[i]),
            int(self.crcs[i]),
        )

    def records(self, positions: np.ndarray | None = None) -> list[EntryRecord]:
        """The entries at ``positions`` (default: all) as :class:`EntryRecord` tuples."""
        if positions is None:
            positions = np.arange(len(self.head_ids))
        ids = self.head_ids[positions].tolist()
        dtypes = [h[0] for h in self.heads] + [0]  # -1: a placeholder, replaced below
        shapes = [h[1] for h in self.heads] + [()]
        out: list[EntryRecord] = list(
            map(
                tuple.__new__,
                repeat(EntryRecord),
                zip(
                    map(dtypes.__getitem__, ids),
                    map(shapes.__getitem__, ids),
                    self.shard_ids[positions].tolist(),
                    self.offsets[positions].tolist(),
                    self.sizes[positions].tolist(),
                    self.crcs[positions].tolist(),
                    repeat(()),
                    strict=False,
                ),
            )
        )
        if self.alone:
            for j in np.flatnonzero(self.head_ids[positions] < 0).tolist():
                out[j] = self.alone[int(positions[j])]
        return out


@dataclass
class EntryBatch:
    """Decoded entries, in the order given, plus the columns of those decoded together."""

    records: list[EntryRecord]
    #: The distinct (dtype, shape) heads of the entries decoded together.
    heads: list[tuple[int, tuple[int, ...]]]
    #: Per entry: its index in ``heads``, or -1 if it was decoded on its own.
    head_ids: np.ndarray
    shard_ids: np.ndarray
    sizes: np.ndarray


#: Entries decoded together at a time: bounds the temporary arrays (~200 bytes per entry, ~3 MiB).
CHUNK = 1 << 14


def _varints(
    buf: np.ndarray, at: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, length, ok) of the varint starting at each ``at``: ok if it ends before its
    entry's end within _MAX_VARINT bytes."""
    raw = buf[at[:, None] + np.arange(_MAX_VARINT)]
    last = raw < 0x80
    length = np.argmax(last, axis=1) + 1
    ok = last.any(axis=1) & (at + length <= ends)
    width = int(length.max()) if len(length) else 0
    digits = (raw[:, :width] & 0x7F).astype(np.uint64)
    digits <<= _SHIFTS[:width]
    digits[np.arange(width) >= length[:, None]] = 0
    return digits.sum(axis=1, dtype=np.uint64).astype(np.int64), length, ok


def decode_batch(values: Sequence[bytes]) -> EntryBatch:
    """Decode every value (see the module docstring); raises what ``decode_entry`` raises for
    the first value it refuses."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    columns = decode_columns(b"".join(values), offsets)
    return EntryBatch(
        columns.records(), columns.heads, columns.head_ids, columns.shard_ids, columns.sizes
    )


def decode_columns(
    data: bytes | bytearray,
    offsets: np.ndarray,
    chunk: int = CHUNK,
    head_index: dict[tuple[int, tuple[int, ...]], int] | None = None,
) -> EntryColumns:
    """Decode the values ``data[offsets[i]:offsets[i + 1]]`` as :func:`decode_batch` does,
    into columns, ``chunk`` entries at a time; raises what ``decode_entry`` raises for the
    first value it refuses. ``head_index`` (head -> id, extended in place) shares head ids
    across calls; the result's ``heads`` are then all of its heads so far."""
    n = len(offsets) - 1
    if head_index is None:
        head_index = {}
    # The columns filled a chunk at a time (no list of chunks concatenated at the end: that
    # held every column twice at the peak of a 10^6-entry index). Shard ids fit an int32
    # (larger ones are decoded alone) and head ids too: 4 bytes each.
    head_ids = np.empty(n, dtype=np.int32)
    shard_ids = np.empty(n, dtype=np.int32)
    offs = np.empty(n, dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    crcs = np.empty(n, dtype=np.uint32)
    alone: dict[int, EntryRecord] = {}
    # Padding: every gather below stays inside the buffer whatever the entries hold.
    pad = bytes(4 + 128 + 2 * _MAX_VARINT + 8)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        base = int(offsets[lo])
        # One chunk's bytes at a time (copied with the padding), not the whole index.
        buf = np.frombuffer(data[base : int(offsets[hi])] + pad, dtype=np.uint8)
        starts = offsets[lo:hi] - base
        ends = offsets[lo + 1 : hi + 1] - base
        local, ids, shards, offs[lo:hi], sizes[lo:hi], crcs[lo:hi], ok = _decode_chunk(
            buf, starts, ends
        )
        shard_ids[lo:hi] = np.where(ok, shards, 0)
        mapping = np.array(
            [head_index.setdefault(h, len(head_index)) for h in local] + [-1], dtype=np.int32
        )
        head_ids[lo:hi] = mapping[np.where(ok, ids, -1)]
        for i in np.flatnonzero(~ok).tolist():
            start, end = int(starts[i]) + base, int(ends[i]) + base
            alone[lo + i] = decode_record(bytes(data[start:end]))
    return EntryColumns(list(head_index), head_ids, shard_ids, offs, sizes, crcs, alone)


_COLUMN_DTYPES = (np.int32, np.int32, np.int64, np.int64, np.uint32)


class ColumnsBuilder:
    """:class:`EntryColumns` decoded a piece of values at a time (:meth:`add`) and joined
    at the end (:meth:`finish`) a column at a time: what a reader holds at its peak is the
    columns plus one of them, never every value's bytes."""

    def __init__(self) -> None:
        self._heads: dict[tuple[int, tuple[int, ...]], int] = {}
        self._parts: list[list[np.ndarray]] = [[], [], [], [], []]
        self._alone: dict[int, EntryRecord] = {}
        self._count = 0

    def add(self, data: bytes | bytearray, offsets: np.ndarray) -> None:
        """Decode the values ``data[offsets[i]:offsets[i + 1]]`` (the next entries)."""
        columns = decode_columns(data, offsets, head_index=self._heads)
        for i, record in columns.alone.items():
            self._alone[self._count + i] = record
        for part, column in zip(
            self._parts,
            (columns.head_ids, columns.shard_ids, columns.offsets, columns.sizes, columns.crcs),
            strict=True,
        ):
            part.append(column)
        self._count += len(columns)

    def finish(self) -> EntryColumns:
        """Every entry added, in order."""
        joined = []
        for part, dtype in zip(self._parts, _COLUMN_DTYPES, strict=True):
            joined.append(np.concatenate(part) if part else np.zeros(0, dtype))
            part.clear()
        head_ids, shard_ids, offsets, sizes, crcs = joined
        heads = list(self._heads)
        return EntryColumns(heads, head_ids, shard_ids, offsets, sizes, crcs, self._alone)


def _decode_chunk(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[
    list[tuple[int, tuple[int, ...]]],
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
]:
    """The entries from ``starts`` to ``ends`` in ``buf``: (their distinct heads, each one's
    head id, shard ids, offsets, sizes, crcs, which were decoded together)."""
    n = len(starts)
    lengths = ends - starts
    first = buf[starts[:, None] + np.arange(4)]
    ok = (
        (lengths >= 4)
        & (first[:, 0] == 0x08)
        & (first[:, 1] < 0x80)
        & (first[:, 2] == 0x12)
        & (first[:, 3] < 0x80)
    )
    split = 4 + first[:, 3].astype(np.int64)
    ok &= split <= lengths
    split[~ok] = 0  # every position below stays within its entry (or just past its end)
    # Distinct heads: rows of (split, the head's bytes, zeros after it) compared as bytes.
    width = int(split[ok].max()) if ok.any() else 4
    cols = np.arange(width)
    rows = np.zeros((n, width + 1), dtype=np.uint8)
    rows[:, 0] = split
    rows[:, 1:] = buf[starts[:, None] + cols] * (cols < split[:, None])
    keys = np.ascontiguousarray(rows).view(np.dtype((np.void, width + 1))).ravel()
    unique, head_ids = np.unique(keys, return_inverse=True)
    head_ids = head_ids.ravel().astype(np.int64)
    heads: list[tuple[int, tuple[int, ...]]] = []
    bad_heads: list[int] = []
    for i, key in enumerate(unique.tolist()):
        raw = bytes(key)
        head = raw[1 : 1 + raw[0]]
        known = DECODED_HEADS.get(head)
        if known is None:
            try:
                entry = decode_entry_fast(head)
            except (NotCanonical, IndexError):
                bad_heads.append(i)
                known = (0, ())
            else:
                known = (entry.dtype, entry.shape)
        heads.append(known)
    if bad_heads:
        ok &= ~np.isin(head_ids, bad_heads)

    pos = starts + split
    columns = []
    for tag in (0x18, 0x20, 0x28):
        column = np.zeros(n, dtype=np.int64)
        columns.append(column)
        has = np.flatnonzero((pos < ends) & (buf[pos] == tag))
        if not has.size:
            continue
        value, length, good = _varints(buf, pos[has] + 1, ends[has])
        ok[has[~good]] = False
        column[has] = np.where(good, value, 0)
        pos[has] = np.minimum(pos[has] + 1 + length, ends[has])
    has = (pos < ends) & (buf[pos] == 0x35)
    ok &= ~has | (pos + 5 <= ends)
    crc_bytes = buf[pos[:, None] + np.arange(1, 5)].astype(np.uint32)
    crc = crc_bytes[:, 0] | crc_bytes[:, 1] << 8 | crc_bytes[:, 2] << 16 | crc_bytes[:, 3] << 24
    crcs = np.where(has, crc, 0).astype(np.uint32)
    pos = np.where(has, pos + 5, pos)  # pos + 5 <= ends where ok
    shard_ids, offsets, sizes = columns
    ok &= (pos == ends) & (shard_ids <= INT32_MAX)
    return heads, head_ids, shard_ids, offsets, sizes, crcs, ok

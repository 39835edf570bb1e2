"""Looking keys up in a table without parsing all of it, as TensorFlow's reader does.

:class:`LazyTable` checks, when it is made, everything that can be checked without decoding
entries: the footer and magic number, the index block, that every data block lies inside the
file, and every block's checksum (so a damaged byte anywhere in the blocks is still caught at
open). Data blocks are parsed only when a key is looked up: a binary search over the index
block's separator keys picks the block, a binary search over that block's restart points picks
the run of (at most 16) entries, and a short scan finds the key. :meth:`LazyTable.items` parses
every block once (cached) with all the checks of :func:`~anyckpt.codecs.table.read_table`.

Every bound is checked before it is used: hostile bytes raise :class:`DecodeError`, never an
IndexError, a hang or a large allocation. Keys expand to at most
:func:`~anyckpt.codecs.table.key_budget` of the table's size, whether all are decoded or one
restart run is scanned for a lookup (a prefix-compression bomb is refused, not expanded).
:meth:`LazyTable.packed` decodes every entry into two byte blobs and their offsets, no Python
object per entry. Like TensorFlow's, a lookup trusts a block's restart
points (they are covered by the block's checksum, so only a crafted file can lie there): crafted
ones may make it miss or misread a key, within the block; :meth:`LazyTable.items` does not use
them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from . import DecodeError
from .table import (
    BlockHandle,
    block_entries,
    block_entries_into,
    decode_block_entry,
    key_bomb,
    key_budget,
    read_block,
    read_index_block,
    split_block,
)
from .table_columns import BlockRun, decode_block_run


@dataclass(frozen=True)
class PackedEntries:
    """A table's entries as columns: entry ``i``'s key is ``keys[key_offsets[i]:
    key_offsets[i + 1]]``, its value likewise in ``values``."""

    keys: bytearray
    key_offsets: np.ndarray
    values: bytearray
    value_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.key_offsets) - 1

    def key(self, i: int) -> bytes:
        return bytes(self.keys[int(self.key_offsets[i]) : int(self.key_offsets[i + 1])])

    def value(self, i: int) -> bytes:
        return bytes(self.values[int(self.value_offsets[i]) : int(self.value_offsets[i + 1])])


#: Entries per piece of :meth:`LazyTable.packed_pieces` (at least; whole blocks).
PIECE_ENTRIES = 1 << 14

#: Bytes of data blocks :meth:`LazyTable.packed_pieces` decodes together (one block at least).
GROUP_BYTES = 256 << 10


class _Piece:
    """Blocks' entries gathered into one :class:`PackedEntries`."""

    def __init__(self) -> None:
        self.keys = bytearray()
        self.values = bytearray()
        self.key_ends: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.value_ends: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.count = 0

    def add(self, keys: list[bytes], values: list[bytes]) -> None:
        self.key_ends.append(_ends(keys, len(self.keys)))
        self.value_ends.append(_ends(values, len(self.values)))
        self.keys += b"".join(keys)
        self.values += b"".join(values)
        self.count += len(keys)

    def add_packed(self, run: BlockRun) -> None:
        self.key_ends.append(run.key_offsets[1:] + len(self.keys))
        self.value_ends.append(run.value_offsets[1:] + len(self.values))
        self.keys += run.keys
        self.values += run.values
        self.count += len(run)

    def done(self) -> PackedEntries:
        return PackedEntries(
            self.keys, np.concatenate(self.key_ends), self.values, np.concatenate(self.value_ends)
        )


def _ends(items: list[bytes], base: int) -> np.ndarray:
    """Where each item ends in their concatenation placed at ``base``."""
    ends = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    np.cumsum(ends, out=ends)
    ends += base
    return ends


class _Block:
    """One data block: its entry bytes and restart offsets (checked lazily, at use)."""

    __slots__ = ("_lookups", "_restart_keys", "_sorted_restart_keys", "budget", "data", "restarts")

    def __init__(self, contents: memoryview, budget: int) -> None:
        self.data, self.restarts = split_block(contents)
        self._restart_keys: dict[int, bytes] = {}
        #: Every restart point's key, made at the block's second lookup (a restore of 1% of
        #: 10,000 keys looks ~50 up in each of two 256 KiB blocks of ~300 restart points).
        self._sorted_restart_keys: list[bytes] | None = None
        self._lookups = 0
        #: Key bytes one scan may expand (a crafted restart run may hold any number of keys).
        self.budget = budget

    def _entry_at(self, pos: int, prev: bytes) -> tuple[bytes, int, int]:
        """(key, value start, value end) of the entry at ``pos``; ``prev`` is the key
        before it (b"" at a restart point)."""
        if pos >= len(self.data):
            raise DecodeError(
                f"data block: entry offset {pos} is past its entries ({len(self.data)})"
            )
        return decode_block_entry(self.data, pos, prev)

    def _restart_key(self, i: int) -> bytes:
        try:
            return self._restart_keys[i]
        except KeyError:
            pass
        # A restart point shares nothing: with b"" before it, a shared prefix is refused.
        key = self._entry_at(self.restarts[i], b"")[0]
        self._restart_keys[i] = key
        return key

    def _all_restart_keys(self) -> list[bytes]:
        """Every restart point's key: sliced at offsets found with NumPy when every restart
        entry has one-byte lengths and shares nothing (nearly always), else decoded one by
        one (which raises for a bad one)."""
        data, size = self.data, len(self.data)
        at = np.array(self.restarts, dtype=np.int64)
        if int(at.max()) + 3 <= size:
            head = np.frombuffer(data, dtype=np.uint8)[at[:, None] + np.arange(3)]
            starts = at + 3
            ends = starts + head[:, 1]
            if (head < 0x80).all() and not head[:, 0].any() and (ends + head[:, 2] <= size).all():
                return [data[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        return [self._restart_key(i) for i in range(len(self.restarts))]

    def _restart_run(self, key: bytes) -> int:
        """The last restart point whose key is <= ``key`` (0 if none): a binary search of
        decoded restart keys, then of all of them once the block is looked up again."""
        keys = self._sorted_restart_keys
        if keys is None:
            self._lookups += 1
            if self._lookups > 1:
                keys = self._sorted_restart_keys = self._all_restart_keys()
        if keys is not None:
            return max(bisect_right(keys, key) - 1, 0)
        lo, hi = 0, len(self.restarts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._restart_key(mid) <= key:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` in this block, or None."""
        if not self.data:
            return None
        restarts = self.restarts
        lo = self._restart_run(key)
        data = self.data
        size = len(data)
        pos = restarts[lo]
        stop = restarts[lo + 1] if lo + 1 < len(restarts) else size
        prev = b""
        spent = 0
        while True:  # at most one restart interval; at least one entry (bounds checked)
            # decode_block_entry inlined for its common case, three one-byte varints (a
            # lookup decodes ~10 entries: the calls were a third of a small restore's time)
            if pos + 3 <= size and data[pos] | data[pos + 1] | data[pos + 2] < 0x80:
                shared, start = data[pos], pos + 3
                end = start + data[pos + 1]
                if shared > len(prev) or end + data[pos + 2] > size:
                    raise DecodeError(f"data block: corrupt entry at offset {start}")
                found = prev[:shared] + data[start:end] if shared else data[start:end]
                start, end = end, end + data[pos + 2]
            else:
                found, start, end = self._entry_at(pos, prev)
            spent += len(found)
            if spent > self.budget:
                raise key_bomb(self.budget)
            if found >= key:
                return self.data[start:end] if found == key else None
            if end >= stop:
                return None
            pos = end
            prev = found


class LazyTable:
    """A table (``.index`` of a V2 bundle) checked at once, parsed on demand."""

    def __init__(self, data: bytes) -> None:
        index = read_index_block(data)
        self._data = data
        self._budget = key_budget(len(data))
        self._separators: list[bytes] = []
        self._handles: list[BlockHandle] = []
        for separator, handle_bytes in block_entries(index, "index", self._budget):
            if self._separators and separator <= self._separators[-1]:
                raise DecodeError(f"index block: separator keys out of order at {separator!r}")
            handle, _ = BlockHandle.decode(handle_bytes)
            read_block(data, handle, "data")  # in the file, checksum, uncompressed
            self._separators.append(separator)
            self._handles.append(handle)
        self._blocks: list[_Block | None] = [None] * len(self._handles)
        self._items: list[tuple[bytes, bytes]] | None = None
        self._columns: tuple[list[bytes], list[bytes]] | None = None
        self._by_key: dict[bytes, bytes] | None = None

    def _block(self, i: int) -> _Block:
        block = self._blocks[i]
        if block is None:
            handle = self._handles[i]
            block = self._blocks[i] = _Block(
                memoryview(self._data)[handle.offset : handle.offset + handle.size], self._budget
            )
        return block

    def first(self) -> tuple[bytes, bytes] | None:
        """The first (smallest) entry, or None if the table is empty."""
        if not self._handles:
            return None
        block = self._block(0)
        if not block.data:
            return None
        key, start, end = block._entry_at(0, b"")
        return key, block.data[start:end]

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        if self._by_key is not None:
            return self._by_key.get(key)
        i = bisect_left(self._separators, key)
        if i == len(self._separators):
            return None
        return self._block(i).get(key)

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) pair in file order; checks that keys strictly increase and that
        each block's keys lie between its separator key and the one before it (so lookups and
        this listing agree)."""
        if self._items is None:
            self._items = list(zip(*self.columns(), strict=True))
        return self._items

    def columns(self) -> tuple[list[bytes], list[bytes]]:
        """:meth:`items` as a list of keys and a list of values (cached)."""
        if self._columns is None:
            keys: list[bytes] = []
            values: list[bytes] = []
            spans = []
            left = self._budget
            for handle in self._handles:
                contents = memoryview(self._data)[handle.offset : handle.offset + handle.size]
                start = len(keys)
                left -= block_entries_into(contents, keys, values, "data", left)
                spans.append((start, len(keys)))
            if keys != sorted(keys) or len(set(keys)) != len(keys):
                for before, key in pairwise(keys):
                    if key <= before:
                        raise DecodeError(f"table keys out of order: {key!r} after {before!r}")
            for i, (start, stop) in enumerate(spans):  # sorted: the first and last suffice
                if start == stop:
                    continue
                if keys[stop - 1] > self._separators[i]:
                    raise DecodeError(
                        f"table key {keys[stop - 1]!r} is outside its block's key range"
                    )
                if i and keys[start] <= self._separators[i - 1]:
                    raise DecodeError(f"table key {keys[start]!r} is outside its block's key range")
            self._columns = (keys, values)
        return self._columns

    def packed(self) -> PackedEntries:
        """Every entry as :class:`PackedEntries` (not cached), with the checks of
        :meth:`items`: block by block, so no Python object per entry outlives its block."""
        return next(self.packed_pieces(min_entries=-1))

    def packed_pieces(self, min_entries: int = PIECE_ENTRIES) -> Iterator[PackedEntries]:
        """:meth:`packed` a run of blocks at a time, each piece its own :class:`PackedEntries`
        (offsets from 0) of at least ``min_entries`` entries but the last (one piece in all
        if ``min_entries`` is negative): a caller that keeps only what it makes of each piece
        never holds every value at once. The checks are :meth:`packed`'s, across pieces too."""
        left = self._budget
        last: bytes | None = None
        piece = _Piece()
        yielded = False
        for group in self._block_groups():
            run = decode_block_run(self._contents(group), left)
            if run is not None and self._run_in_place(run, group, last):
                left -= run.key_bytes
                if len(run):
                    last = run.key(len(run) - 1)
                piece.add_packed(run)
            else:  # entry by entry: what it accepts is the same, and it names what is wrong
                for i in group:
                    left, last = self._block_into(piece, i, left, last)
            if 0 <= min_entries <= piece.count:
                yield piece.done()
                yielded = True
                piece = _Piece()
        if piece.count or not yielded:
            yield piece.done()

    def _block_groups(self) -> Iterator[range]:
        """Runs of consecutive data blocks of about :data:`GROUP_BYTES` (one block at least)."""
        start, size = 0, 0
        for i, handle in enumerate(self._handles):
            size += handle.size
            if size >= GROUP_BYTES:
                yield range(start, i + 1)
                start, size = i + 1, 0
        if start < len(self._handles):
            yield range(start, len(self._handles))

    def _contents(self, blocks: range) -> list[memoryview]:
        view = memoryview(self._data)
        return [view[h.offset : h.offset + h.size] for h in (self._handles[i] for i in blocks)]

    def _run_in_place(self, run: BlockRun, blocks: range, last: bytes | None) -> bool:
        """Whether ``run``'s keys follow ``last`` and each block's lie in its key range (its
        own order :func:`decode_block_run` checked)."""
        if len(run) and last is not None and run.key(0) <= last:
            return False
        at = 0
        for i, count in zip(blocks, run.counts, strict=True):
            if not count:
                continue
            if run.key(at + count - 1) > self._separators[i]:
                return False
            if i and run.key(at) <= self._separators[i - 1]:
                return False
            at += count
        return True

    def _block_into(
        self, piece: _Piece, i: int, left: int, last: bytes | None
    ) -> tuple[int, bytes | None]:
        """Block ``i`` decoded entry by entry into ``piece``, checked; (budget left, last key)."""
        handle = self._handles[i]
        contents = memoryview(self._data)[handle.offset : handle.offset + handle.size]
        keys: list[bytes] = []
        values: list[bytes] = []
        left -= block_entries_into(contents, keys, values, "data", left)
        if not keys:
            return left, last
        if not all(map(bytes.__lt__, keys, keys[1:])):
            for before, key in pairwise(keys):
                if key <= before:
                    raise DecodeError(f"table keys out of order: {key!r} after {before!r}")
        if last is not None and keys[0] <= last:
            raise DecodeError(f"table keys out of order: {keys[0]!r} after {last!r}")
        if keys[-1] > self._separators[i]:
            raise DecodeError(f"table key {keys[-1]!r} is outside its block's key range")
        if i and keys[0] <= self._separators[i - 1]:
            raise DecodeError(f"table key {keys[0]!r} is outside its block's key range")
        piece.add(keys, values)
        return left, keys[-1]

    def as_dict(self) -> dict[bytes, bytes]:
        """:meth:`items` as a dict (cached; lookups use it from then on)."""
        if self._by_key is None:
            self._by_key = dict(self.items())
        return self._by_key

"""Looking keys up in a table without parsing all of it, as TensorFlow's reader does.

:class:`LazyTable` checks, when it is made, everything that can be checked without decoding
entries: the footer and magic number, the index block, that every data block lies inside the
file, and every block's checksum (so a damaged byte anywhere in the blocks is still caught at
open). Data blocks are parsed only when a key is looked up: a binary search over the index
block's separator keys picks the block, a binary search over that block's restart points picks
the run of (at most 16) entries, and a short scan finds the key. :meth:`LazyTable.items` parses
every block once (cached) with all the checks of :func:`~anyckpt.codecs.table.read_table`.

Every bound is checked before it is used: hostile bytes raise :class:`DecodeError`, never an
IndexError, a hang or a large allocation. Like TensorFlow's, a lookup trusts a block's restart
points (they are covered by the block's checksum, so only a crafted file can lie there): crafted
ones may make it miss or misread a key, within the block; :meth:`LazyTable.items` does not use
them.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import pairwise

from . import DecodeError
from .table import (
    BlockHandle,
    _block_entries,
    _read_block,
    block_entries_into,
    decode_block_entry,
    read_index_block,
    split_block,
)


class _Block:
    """One data block: its entry bytes and restart offsets (checked lazily, at use)."""

    __slots__ = ("_restart_keys", "data", "restarts")

    def __init__(self, contents: memoryview) -> None:
        self.data, self.restarts = split_block(contents)
        self._restart_keys: dict[int, bytes] = {}

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

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` in this block, or None."""
        if not self.data:
            return None
        restarts = self.restarts
        lo, hi = 0, len(restarts) - 1
        while lo < hi:  # the last restart point whose key is <= key
            mid = (lo + hi + 1) // 2
            if self._restart_key(mid) <= key:
                lo = mid
            else:
                hi = mid - 1
        pos = restarts[lo]
        stop = restarts[lo + 1] if lo + 1 < len(restarts) else len(self.data)
        prev = b""
        while True:  # at most one restart interval; at least one entry (bounds checked)
            found, start, end = self._entry_at(pos, prev)
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
        self._separators: list[bytes] = []
        self._handles: list[BlockHandle] = []
        for separator, handle_bytes in _block_entries(index, "index"):
            if self._separators and separator <= self._separators[-1]:
                raise DecodeError(f"index block: separator keys out of order at {separator!r}")
            handle, _ = BlockHandle.decode(handle_bytes)
            _read_block(data, handle, "data")  # in the file, checksum, uncompressed
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
                memoryview(self._data)[handle.offset : handle.offset + handle.size]
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
            for handle in self._handles:
                contents = memoryview(self._data)[handle.offset : handle.offset + handle.size]
                start = len(keys)
                block_entries_into(contents, keys, values)
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

    def as_dict(self) -> dict[bytes, bytes]:
        """:meth:`items` as a dict (cached; lookups use it from then on)."""
        if self._by_key is None:
            self._by_key = dict(self.items())
        return self._by_key

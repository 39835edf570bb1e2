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

import struct
from bisect import bisect_left
from itertools import pairwise

from . import DecodeError
from .crc import crc32c, mask
from .table import (
    BLOCK_TRAILER_SIZE,
    FOOTER_SIZE,
    MAGIC,
    NO_COMPRESSION,
    BlockHandle,
    _block_entries,
    _read_block,
    block_entries_into,
)
from .varint import decode_varint

_U32 = struct.Struct("<I")


class _Block:
    """One data block: its entry bytes and restart offsets (checked lazily, at use)."""

    __slots__ = ("_restart_keys", "data", "restarts")

    def __init__(self, contents: memoryview) -> None:
        size = len(contents)
        (num_restarts,) = _U32.unpack_from(contents, size - 4)
        restarts_start = size - 4 - 4 * num_restarts
        if num_restarts == 0 or restarts_start < 0:
            raise DecodeError(f"data block: bad restart count {num_restarts}")
        self.data = bytes(contents[:restarts_start])
        self.restarts = struct.unpack_from(f"<{num_restarts}I", contents, restarts_start)
        self._restart_keys: dict[int, bytes] = {}

    def _entry_at(self, pos: int, prev: bytes) -> tuple[bytes, int, int]:
        """(key, value start, value end) of the entry at ``pos``; ``prev`` is the key
        before it (b"" at a restart point)."""
        data = self.data
        end = len(data)
        if pos >= end:
            raise DecodeError(f"data block: entry offset {pos} is past its entries ({end})")
        # Three varints, one byte each nearly always: that case inline.
        shared = data[pos]
        if shared < 0x80:
            pos += 1
        else:
            shared, pos = decode_varint(data, pos, end)
        non_shared = data[pos] if pos < end else 0x80
        if non_shared < 0x80:
            pos += 1
        else:
            non_shared, pos = decode_varint(data, pos, end)
        value_len = data[pos] if pos < end else 0x80
        if value_len < 0x80:
            pos += 1
        else:
            value_len, pos = decode_varint(data, pos, end)
        if shared > len(prev) or pos + non_shared + value_len > end:
            raise DecodeError(f"data block: corrupt entry at offset {pos}")
        key_end = pos + non_shared
        key = prev[:shared] + data[pos:key_end] if shared else data[pos:key_end]
        return key, key_end, key_end + value_len

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
        if len(data) < FOOTER_SIZE:
            raise DecodeError(f"file too short for a table footer ({len(data)} bytes)")
        footer_start = len(data) - FOOTER_SIZE
        (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
        if magic != MAGIC:
            raise DecodeError(f"bad table magic number {magic:#018x} (expected {MAGIC:#018x})")
        limit = len(data) - 8
        _, pos = BlockHandle.decode(data, footer_start, limit)  # metaindex: TF writes it empty
        index_handle, _ = BlockHandle.decode(data, pos, limit)
        index = _read_block(data, index_handle, "index")
        self._data = data
        self._separators: list[bytes] = []
        self._handles: list[BlockHandle] = []
        for separator, handle_bytes in _block_entries(index, "index"):
            if self._separators and separator <= self._separators[-1]:
                raise DecodeError(f"index block: separator keys out of order at {separator!r}")
            handle, _ = BlockHandle.decode(handle_bytes)
            _check_block(data, handle)
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


def _check_block(data: bytes, handle: BlockHandle) -> None:
    """A data block lies inside the file, its checksum matches, it is uncompressed."""
    end = handle.offset + handle.size + BLOCK_TRAILER_SIZE
    if handle.size < 4 or end > len(data) - FOOTER_SIZE:
        raise DecodeError(
            f"data block handle (offset {handle.offset}, size {handle.size}) "
            f"lies outside the file ({len(data)} bytes)"
        )
    at = handle.offset + handle.size
    (stored,) = _U32.unpack_from(data, at + 1)
    actual = mask(crc32c(memoryview(data)[handle.offset : at + 1]))
    if stored != actual:
        raise DecodeError(
            f"data block at offset {handle.offset}: checksum mismatch "
            f"(stored {stored:#010x}, computed {actual:#010x})"
        )
    if data[at] != NO_COMPRESSION:
        raise DecodeError(
            f"data block at offset {handle.offset}: compression type {data[at]} "
            "is not supported (TensorFlow writes 0, none)"
        )

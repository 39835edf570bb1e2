"""The LevelDB-style sorted table ("SSTable") that TensorFlow uses for `.index` and V1 files.

Layout, as ``tensorflow/core/lib/io/table_builder.cc`` writes it::

    data block*  metaindex block  index block  footer (48 bytes)

Every block is followed by a 5-byte trailer: a compression byte (always 0, none) and the masked
CRC-32C of the block contents plus that byte. A block holds prefix-compressed entries
(``varint shared, varint non_shared, varint value_len, key suffix, value``), a restart point every
16 entries (every entry in the index block), then the restart offsets and their count as
little-endian uint32s. The index block maps a short separator key per data block to that block's
handle (varint offset, varint size).
The footer holds the metaindex and index handles, zero padding to 40 bytes, and the magic number.

:class:`TableBuilder` reproduces TensorFlow's bytes exactly (same restart interval, block size
threshold and separator keys); :func:`read_table` checks every length, offset and checksum.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import DecodeError
from .crc import crc32c, mask
from .varint import decode_varint, encode_varint

if TYPE_CHECKING:
    from typing_extensions import Buffer

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
BLOCK_RESTART_INTERVAL = 16
BLOCK_SIZE = 256 * 1024
NO_COMPRESSION = 0
_MAX_HANDLE_LEN = 20  # two varint64s

#: Expanded key bytes a table may decode: :func:`key_budget` of its size. Prefix compression lets
#: a key share any prefix of the key before it, so a crafted restart run of 50,000 keys sharing a
#: 10 KB prefix is 0.8 MB on disk and 500 MB expanded. TensorFlow writes a restart point every 16
#: entries and a key is at most the bytes of its restart run so far, so the keys of a table it
#: wrote total at most 16 × its bytes (in practice about its size: a 1,000,000-tensor index of
#: 24 MB has 8 MB of keys); this budget never refuses one.
KEY_BUDGET_RATIO = 16
KEY_BUDGET_FLOOR = 16 << 20

_U32 = struct.Struct("<I")
#: One-byte varints, precomputed: nearly every length in an index is below 128.
_SMALL = [bytes([i]) for i in range(128)]


def key_budget(table_size: int) -> int:
    """The expanded key bytes a table of ``table_size`` bytes may hold (16 MiB + 16 × its size)."""
    return KEY_BUDGET_FLOOR + KEY_BUDGET_RATIO * table_size


def key_bomb(limit: int) -> DecodeError:
    """The error for a table whose keys expand past ``limit`` bytes."""
    return DecodeError(
        f"keys expand to more than {limit} bytes (the limit: 16 MiB + 16 x the bytes that "
        "hold them): a prefix-compression bomb"
    )


@dataclass(frozen=True)
class BlockHandle:
    """Where a block lives in the file: offset and size of its contents (trailer excluded)."""

    offset: int
    size: int

    def encode(self) -> bytes:
        return encode_varint(self.offset) + encode_varint(self.size)

    @classmethod
    def decode(cls, data: bytes, pos: int = 0, limit: int | None = None) -> tuple[BlockHandle, int]:
        offset, pos = decode_varint(data, pos, limit)
        size, pos = decode_varint(data, pos, limit)
        return cls(offset, size), pos


class BlockBuilder:
    def __init__(self, restart_interval: int = BLOCK_RESTART_INTERVAL) -> None:
        self._interval = restart_interval
        self._buf = bytearray()
        self._restarts = [0]
        self._counter = 0
        self._last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self._counter < self._interval:
            last = self._last_key
            limit = min(len(last), len(key))
            if limit:
                # Length of the common prefix, in C: the first differing byte is the highest
                # set byte of the XOR of both prefixes read as big-endian integers.
                diff = int.from_bytes(last[:limit], "big") ^ int.from_bytes(key[:limit], "big")
                shared = limit - (diff.bit_length() + 7) // 8 if diff else limit
        else:
            self._restarts.append(len(self._buf))
            self._counter = 0
        non_shared = len(key) - shared
        value_len = len(value)
        buf = self._buf
        buf += _SMALL[shared] if shared < 128 else encode_varint(shared)
        buf += _SMALL[non_shared] if non_shared < 128 else encode_varint(non_shared)
        buf += _SMALL[value_len] if value_len < 128 else encode_varint(value_len)
        buf += key[shared:] if shared else key
        buf += value
        self._last_key = key
        self._counter += 1

    def size_estimate(self) -> int:
        return len(self._buf) + 4 * len(self._restarts) + 4

    def empty(self) -> bool:
        return not self._buf

    def finish(self) -> bytes:
        out = self._buf
        for r in self._restarts:
            out += _U32.pack(r)
        out += _U32.pack(len(self._restarts))
        block = bytes(out)
        self._buf = bytearray()
        self._restarts = [0]
        self._counter = 0
        self._last_key = b""
        return block


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (LevelDB's bytewise FindShortestSeparator)."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n:
        byte = start[i]
        if byte < 0xFF and byte + 1 < limit[i]:
            return start[:i] + bytes([byte + 1])
    return start


def short_successor(key: bytes) -> bytes:
    """A short key >= key (LevelDB's bytewise FindShortSuccessor)."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def block_trailer(contents: Buffer, *more: Buffer) -> bytes:
    """The 5 bytes after a block: its compression type (none) and masked CRC-32C (of
    ``contents``, or of ``contents`` and ``more`` back to back: no need to join them)."""
    crc = crc32c(contents)
    for part in more:
        crc = crc32c(part, crc)
    return struct.pack("<BI", NO_COMPRESSION, mask(crc32c(b"\0", crc)))


def footer(metaindex: BlockHandle, index: BlockHandle) -> bytes:
    """The table's last 48 bytes: both handles, zero padding, the magic number."""
    handles = metaindex.encode() + index.encode()
    return handles + bytes(2 * _MAX_HANDLE_LEN - len(handles)) + struct.pack("<Q", MAGIC)


class TableBuilder:
    """Builds a table in memory from keys added in strictly increasing bytewise order.

    ``block_size`` and the restart interval match TensorFlow's defaults, so the output is
    byte-identical to what TensorFlow writes for the same entries.
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self._block_size = block_size
        self._out = bytearray()
        self._data = BlockBuilder()
        # As LevelDB: every index entry is a restart point (block_restart_interval = 1).
        self._index = BlockBuilder(restart_interval=1)
        self._last_key: bytes | None = None
        self._pending_handle: BlockHandle | None = None

    def add(self, key: bytes, value: bytes) -> None:
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"table keys must strictly increase: {key!r} after {self._last_key!r}")
        if self._pending_handle is not None:
            assert self._last_key is not None
            sep = shortest_separator(self._last_key, key)
            self._index.add(sep, self._pending_handle.encode())
            self._pending_handle = None
        self._last_key = key
        self._data.add(key, value)
        if self._data.size_estimate() >= self._block_size:
            self._flush()

    def _flush(self) -> None:
        if self._data.empty():
            return
        self._pending_handle = self._write_block(self._data.finish())

    def _write_block(self, contents: bytes) -> BlockHandle:
        handle = BlockHandle(len(self._out), len(contents))
        self._out += contents
        self._out += block_trailer(contents)
        return handle

    def finish(self) -> bytes:
        """Write the remaining blocks and the footer; return the whole table."""
        self._flush()
        metaindex = self._write_block(BlockBuilder().finish())
        if self._pending_handle is not None:
            assert self._last_key is not None
            self._index.add(short_successor(self._last_key), self._pending_handle.encode())
            self._pending_handle = None
        index = self._write_block(self._index.finish())
        self._out += footer(metaindex, index)
        return bytes(self._out)


def build_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """Build a table from (key, value) pairs given in strictly increasing key order."""
    builder = TableBuilder()
    for key, value in entries:
        builder.add(key, value)
    return builder.finish()


def read_block(data: bytes, handle: BlockHandle, what: str) -> memoryview:
    end = handle.offset + handle.size + BLOCK_TRAILER_SIZE
    if handle.size < 4 or end > len(data) - FOOTER_SIZE:
        raise DecodeError(
            f"{what} block handle (offset {handle.offset}, size {handle.size}) "
            f"lies outside the file ({len(data)} bytes)"
        )
    view = memoryview(data)
    contents = view[handle.offset : handle.offset + handle.size]
    type_byte = data[handle.offset + handle.size]
    (stored,) = _U32.unpack_from(data, handle.offset + handle.size + 1)
    actual = mask(crc32c(bytes([type_byte]), crc32c(contents)))
    if stored != actual:
        raise DecodeError(
            f"{what} block at offset {handle.offset}: checksum mismatch "
            f"(stored {stored:#010x}, computed {actual:#010x})"
        )
    if type_byte != NO_COMPRESSION:
        raise DecodeError(
            f"{what} block at offset {handle.offset}: compression type {type_byte} "
            "is not supported (TensorFlow writes 0, none)"
        )
    return contents


def split_block(block: memoryview, what: str = "data") -> tuple[bytes, tuple[int, ...]]:
    """A block's entry bytes and its restart offsets (the count checked against its size)."""
    size = len(block)
    (num_restarts,) = _U32.unpack_from(block, size - 4)
    restarts_start = size - 4 - 4 * num_restarts
    if num_restarts == 0 or restarts_start < 0:
        raise DecodeError(f"{what} block: bad restart count {num_restarts}")
    restarts = struct.unpack_from(f"<{num_restarts}I", block, restarts_start)
    return bytes(block[:restarts_start]), restarts  # slicing bytes beats a memoryview


def decode_block_entry(
    data: bytes, pos: int, prev: bytes, what: str = "data"
) -> tuple[bytes, int, int]:
    """(key, value start, value end) of the entry at ``pos`` of a block's entry bytes;
    ``prev`` is the key before it (b"" at a restart point). Every length is checked."""
    end = len(data)
    # Three varints; one byte each nearly always, so decode that case inline.
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
        raise DecodeError(f"{what} block: corrupt entry at offset {pos}")
    key_end = pos + non_shared
    key = prev[:shared] + data[pos:key_end] if shared else data[pos:key_end]
    return key, key_end, key_end + value_len


def block_entries_into(
    block: memoryview,
    keys: list[bytes],
    values: list[bytes],
    what: str = "data",
    budget: int | None = None,
) -> int:
    """Append a block's keys and values, in order, to ``keys`` and ``values`` (checking every
    length against the block; prefix compression undone); return the keys' total length.
    Raises DecodeError once that total passes ``budget`` (default: :func:`key_budget` of the
    block's size)."""
    data, _ = split_block(block, what)
    limit = key_budget(len(block)) if budget is None else budget
    add_key = keys.append
    add_value = values.append
    pos = 0
    key = b""
    spent = 0
    while pos < len(data):
        key, start, pos = decode_block_entry(data, pos, key, what)
        spent += len(key)
        if spent > limit:
            raise key_bomb(limit)
        add_key(key)
        add_value(data[start:pos])
    return spent


def block_entries(
    block: memoryview, what: str, budget: int | None = None
) -> Iterator[tuple[bytes, bytes]]:
    keys: list[bytes] = []
    values: list[bytes] = []
    block_entries_into(block, keys, values, what, budget)
    return zip(keys, values, strict=True)


def read_index_block(data: bytes) -> memoryview:
    """The index block of a table, after checking the footer's magic number, that the block
    lies inside the file, and its checksum."""
    if len(data) < FOOTER_SIZE:
        raise DecodeError(f"file too short for a table footer ({len(data)} bytes)")
    footer_start = len(data) - FOOTER_SIZE
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != MAGIC:
        raise DecodeError(f"bad table magic number {magic:#018x} (expected {MAGIC:#018x})")
    limit = len(data) - 8
    _, pos = BlockHandle.decode(data, footer_start, limit)  # metaindex: TF writes it empty
    index_handle, _ = BlockHandle.decode(data, pos, limit)
    return read_block(data, index_handle, "index")


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """Parse a whole table; return its (key, value) pairs in file order.

    Checks the footer's magic number, that every block handle lies inside the file, every
    block's checksum, every entry's lengths, that keys strictly increase, and that they
    expand to at most :func:`key_budget` of the table's size.
    """
    index = read_index_block(data)
    entries: list[tuple[bytes, bytes]] = []
    last: bytes | None = None
    left = key_budget(len(data))
    for _, handle_bytes in block_entries(index, "index", left):
        handle, _ = BlockHandle.decode(handle_bytes)
        keys: list[bytes] = []
        values: list[bytes] = []
        left -= block_entries_into(read_block(data, handle, "data"), keys, values, "data", left)
        for key, value in zip(keys, values, strict=True):
            if last is not None and key <= last:
                raise DecodeError(f"table keys out of order: {key!r} after {last!r}")
            entries.append((key, value))
            last = key
    return entries

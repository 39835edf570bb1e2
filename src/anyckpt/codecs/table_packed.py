"""Building a whole table at once from all its keys and values, column-wise with NumPy.

Produces exactly the bytes of :class:`~anyckpt.codecs.table.TableBuilder` fed the same entries
(same block boundaries, restart points, prefix compression, separators and footer), but
computes the shared key prefixes, the block boundaries and the entry encodings for all entries
with a few array operations instead of a Python call per entry. The V2 writer builds its
``.index`` this way: 10,000 entries take ~2 ms instead of ~25 ms.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .packed import Column, PackedBytes, bytes_column, interleave, varint_column, varint_lengths
from .table import (
    BLOCK_RESTART_INTERVAL,
    BLOCK_SIZE,
    BlockBuilder,
    BlockHandle,
    block_trailer,
    footer,
    short_successor,
    shortest_separator,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: Key bytes compared at once when looking for shared prefixes (longer ones: in Python).
_PREFIX_WINDOW = 128
#: Keys compared per pass when looking for shared prefixes (bounds the padded matrix).
_PREFIX_ROWS = 1 << 14
#: Entries examined at first when looking for the end of a block (doubled as needed).
_BLOCK_WINDOW = 4096


def _shared_prefixes(keys: Sequence[bytes], lengths: np.ndarray) -> np.ndarray:
    """Length of the common prefix of each key with the key before it (0 for the first)."""
    count = len(keys)
    shared = np.zeros(count, dtype=np.int32)  # (a key is far below 2 GiB)
    if count < 2:
        return shared
    width = int(min(lengths.max(), _PREFIX_WINDOW))
    if width == 0:
        return shared
    for low in range(0, count - 1, _PREFIX_ROWS):  # a chunk of keys and the one before it
        high = min(count, low + _PREFIX_ROWS + 1)
        matrix = _padded_rows(keys, low, high, width)
        differ = matrix[1:] != matrix[:-1]
        first = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
        shared[low + 1 : high] = np.minimum(
            first, np.minimum(lengths[low + 1 : high], lengths[low : high - 1])
        )
    # Pairs that agree on the whole window and go on: finish them in Python.
    for i in (np.flatnonzero(shared[1:] == width) + 1).tolist():
        a, b = keys[i - 1], keys[i]
        limit = min(len(a), len(b))
        diff = int.from_bytes(a[:limit], "big") ^ int.from_bytes(b[:limit], "big")
        shared[i] = limit - (diff.bit_length() + 7) // 8 if diff else limit
    return shared


def _padded_rows(keys: Sequence[bytes], low: int, high: int, width: int) -> np.ndarray:
    """Keys ``low:high``'s first ``width`` bytes, zero-padded, as the rows of a uint8 matrix
    (NumPy's fixed-width bytes dtype truncates and pads in C; packed keys are gathered from
    their buffer)."""
    if not isinstance(keys, PackedBytes):
        fixed = np.array(keys[low:high], dtype=f"S{width}").view(np.uint8)
        return fixed.reshape(high - low, width)
    columns = np.arange(width, dtype=np.int32)
    inside = columns < keys.lengths[low:high, None]
    index = np.where(inside, keys.starts[low:high, None] + columns, 0)
    matrix: np.ndarray = np.frombuffer(keys.data, dtype=np.uint8)[index]
    matrix[~inside] = 0
    return matrix


def _increasing(keys: Sequence[bytes], shared: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether ``keys`` strictly increase: for packed keys known to be sorted, checked only
    for equal neighbours (a prefix shared whole, the same length), else compared."""
    if isinstance(keys, PackedBytes) and keys.increasing:
        same = (shared[1:] == lengths[1:]) & (lengths[1:] == lengths[:-1])
        return not bool(same.any())
    return all(map(operator.lt, keys, keys[1:]))


def _block_ends(
    prefix: np.ndarray, key_lengths: np.ndarray, value_lengths: np.ndarray, block_size: int
) -> list[int]:
    """Where TableBuilder closes each data block: after the entry that brings the block's size
    estimate (contents + 4 bytes per restart point + 4) to ``block_size`` or more."""
    count = len(prefix)
    value_varints = varint_lengths(value_lengths)
    ends: list[int] = []
    start = 0
    window = _BLOCK_WINDOW
    while start < count:
        stop = min(count, start + window)
        position = np.arange(stop - start, dtype=np.int64)
        restart = position % BLOCK_RESTART_INTERVAL == 0
        shared = np.where(restart, 0, prefix[start:stop])
        non_shared = key_lengths[start:stop] - shared
        size = (
            varint_lengths(shared)
            + varint_lengths(non_shared)
            + value_varints[start:stop]
            + non_shared
            + value_lengths[start:stop]
        )
        estimate = np.cumsum(size) + 4 * (position // BLOCK_RESTART_INTERVAL + 1) + 4
        full = np.flatnonzero(estimate >= block_size)
        if len(full):
            start += int(full[0]) + 1
        elif stop == count:
            start = count
        else:
            window *= 2  # the block goes on past the window: look further
            continue
        ends.append(start)
        window = _BLOCK_WINDOW
    return ends


def _with_trailer(out: list[Buffer], offset: int, contents: bytes) -> BlockHandle:
    out.append(contents)
    out.append(block_trailer(contents))
    return BlockHandle(offset, len(contents))


class TableLayout(NamedTuple):
    """Where a built table's entries and data blocks lie, to patch values in place later."""

    entry_ends: (
        np.ndarray
    )  # int32 (int64 past 1 GiB): each entry's end (its value's end) in the table
    data_blocks: list[tuple[int, int]]  # each data block's (offset, size of its contents)


def build_table_packed(
    keys: Sequence[bytes], values: Column, *, block_size: int = BLOCK_SIZE
) -> bytes:
    """The table of ``keys`` (strictly increasing, bytewise) and their ``values``, byte for
    byte what :class:`~anyckpt.codecs.table.TableBuilder` writes for the same entries."""
    return build_table_with_layout(keys, values, block_size=block_size)[0]


def replace_value_tails(
    table: bytes, layout: TableLayout, entries: np.ndarray, tails: np.ndarray
) -> bytes:
    """``table`` with the last ``tails.shape[1]`` bytes of the values of ``entries`` (entry
    numbers) replaced by the rows of ``tails`` (uint8), and every data block's trailer
    recomputed: the table :func:`build_table_packed` builds from the same keys and the values
    so changed, without building it again (nothing else depends on those bytes)."""
    width = tails.shape[1]
    out = bytearray(table)
    view = np.frombuffer(out, dtype=np.uint8)
    ends = layout.entry_ends[entries]
    view[(ends - width)[:, None] + np.arange(width)] = tails
    with memoryview(out) as buffer:
        for offset, size in layout.data_blocks:
            out[offset + size : offset + size + 5] = block_trailer(buffer[offset : offset + size])
    return bytes(out)


def build_table_with_layout(
    keys: Sequence[bytes],
    values: Column | Callable[[], Column],
    *,
    block_size: int = BLOCK_SIZE,
) -> tuple[bytes, TableLayout]:
    """:func:`build_table_packed`, and the table's :class:`TableLayout`. ``values`` may be
    a function that makes them: then they are freed once laid out in the entries (before the
    table is joined), not held by the caller to the end."""
    if not isinstance(values, Column):
        values = values()
    count = len(keys)
    if len(values) != count:
        raise ValueError(f"{count} keys but {len(values)} values")
    key_column = bytes_column(keys)
    shared = _shared_prefixes(keys, key_column.lengths)
    if not _increasing(keys, shared, key_column.lengths):
        raise ValueError("table keys must strictly increase")
    ends = _block_ends(shared, key_column.lengths, values.lengths, block_size)
    # Each entry's shared prefix within its own block (0 at every restart point).
    restart_at = _restart_points(ends)
    shared[restart_at] = 0
    non_shared = key_column.lengths - shared
    suffix_starts = key_column.starts  # bytes_column's own array: moved in place
    suffix_starts += shared
    entries = interleave(
        [
            varint_column(shared),
            varint_column(non_shared),
            varint_column(values.lengths),
            Column(key_column.data, suffix_starts, non_shared),
            values,
        ]
    )
    del key_column, suffix_starts, shared, non_shared, values  # all in `entries` now
    out, offset, index, layout = _data_blocks(keys, entries, ends, restart_at)
    metaindex = _with_trailer(out, offset, BlockBuilder().finish())
    offset += metaindex.size + 5
    index_handle = _with_trailer(out, offset, index.finish())
    out.append(footer(metaindex, index_handle))
    return b"".join(out), layout


def _restart_points(ends: list[int]) -> np.ndarray:
    """The entries that start a restart run (no key prefix shared): every
    BLOCK_RESTART_INTERVAL-th entry of each block, the blocks ending at ``ends``."""
    if not ends:
        return np.zeros(0, dtype=np.int64)
    firsts = [0, *ends[:-1]]
    step = BLOCK_RESTART_INTERVAL
    return np.concatenate(
        [np.arange(a, b, step, dtype=np.int64) for a, b in zip(firsts, ends, strict=True)]
    )


def _data_blocks(
    keys: Sequence[bytes], entries: Column, ends: list[int], restart_at: np.ndarray
) -> tuple[list[Buffer], int, BlockBuilder, TableLayout]:
    """The data blocks: the encoded ``entries`` cut after each of ``ends``, each block followed
    by its restart points (entries ``restart_at``) and its trailer. Returns the pieces of the
    table so far (views of ``entries.data``: no copy until the table is joined), its size, the
    index block (one entry per data block) and the layout."""
    count = len(entries)
    data = memoryview(entries.data)  # type: ignore[arg-type]  # a uint8 array: a buffer
    starts = entries.starts
    restart_starts = starts[restart_at]
    cuts = np.searchsorted(restart_at, ends).tolist()  # restart points before each end
    # Each entry's end in `data`; then in the table (int32 while that is far below 2 GiB).
    entry_ends = starts.astype(np.int32 if len(data) < 2**30 else np.int64)
    entry_ends += entries.lengths
    out: list[Buffer] = []
    index = BlockBuilder(restart_interval=1)
    data_blocks: list[tuple[int, int]] = []
    offset = first = r = 0
    for number, (end, cut) in enumerate(zip(ends, cuts, strict=True)):
        base = int(starts[first])
        body = data[base : int(starts[end]) if end < count else len(data)]
        entry_ends[first:end] += offset - base
        points = (restart_starts[r:cut] - base).astype("<u4").tobytes()
        points += struct.pack("<I", cut - r)
        out += (body, points, block_trailer(body, points))
        size = len(body) + len(points)
        data_blocks.append((offset, size))
        last = keys[end - 1]
        separator = (
            short_successor(last)
            if number == len(ends) - 1
            else (shortest_separator(last, keys[end]))
        )
        index.add(separator, BlockHandle(offset, size).encode())
        offset += size + 5
        first, r = end, cut
    return out, offset, index, TableLayout(entry_ends, data_blocks)

"""A run of a table's data blocks decoded with NumPy, all their restart runs side by side.

Decoding a block entry by entry in Python costs ~1 µs an entry (three varints, a key made from
the one before it, two list appends): most of listing a V2 index of 10^4-10^6 tensors. A block's
restart points split it into runs of (TensorFlow's and our writers': 16) entries whose first
entry shares nothing with the key before it, so every run can be decoded independently: step
``s`` decodes the ``s``-th entry of every run at once. :func:`decode_block_run` does that for
the runs of several blocks together, then copies the keys' shared prefixes step by step and the
deltas and values with one gather each.

It answers only where its result is certainly the entry-by-entry parse's
(:func:`~anyckpt.codecs.table.block_entries_into` over each block, in order): the restart
points tile each block's entries exactly, each run starts with an entry that shares nothing,
every entry lies inside its run, runs hold at most :data:`MAX_RUN` entries, the keys expand to
at most the budget, and each key is greater than the one before it as its shared prefix shows
(the first byte after the prefix is greater; within a block, and byte for byte across runs).
Anything else (a hostile file, a writer that shares less than it could) returns None and the
caller decodes entry by entry, which accepts what is valid and raises the exact error for what
is not. Every index is bounded before it is used: the entry bytes are padded, and no entry's
lengths are trusted before they are checked against its run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import DecodeError
from .table import split_block

#: Entries per restart run the vectorized path steps through (TensorFlow writes 16).
MAX_RUN = 64

#: Bytes read past any entry's first byte before its lengths are checked (three varints of
#: at most 5 bytes each): the entry bytes are padded by this much.
_PAD = 16


@dataclass(frozen=True)
class BlockRun:
    """The entries of consecutive blocks: key ``i`` is ``keys[key_offsets[i]:key_offsets[i +
    1]]``, its value likewise; ``counts[b]`` entries came from block ``b``."""

    keys: bytearray
    key_offsets: np.ndarray
    values: bytearray
    value_offsets: np.ndarray
    counts: list[int]

    def __len__(self) -> int:
        return len(self.key_offsets) - 1

    def key(self, i: int) -> bytes:
        return bytes(self.keys[int(self.key_offsets[i]) : int(self.key_offsets[i + 1])])

    @property
    def key_bytes(self) -> int:
        return int(self.key_offsets[-1])


def _varint(buf: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The varint at each of ``pos`` and its length in bytes; None if one is longer than 5
    bytes (no valid length of a block is)."""
    byte = buf[pos].astype(np.int64)
    value = byte & 0x7F
    size = np.ones(len(pos), dtype=np.int64)
    more = byte >= 0x80
    shift = 7
    while more.any():
        if shift > 28:
            return None
        byte = buf[pos + size].astype(np.int64)
        value |= np.where(more, (byte & 0x7F) << shift, 0)
        size += more
        more &= byte >= 0x80
        shift += 7
    return value, size


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices ``starts[i] + k`` for ``k < lengths[i]``, for every ``i`` in order."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if not total:
        return np.zeros(0, dtype=np.int64)
    out: np.ndarray = np.repeat(starts - (ends - lengths), lengths) + np.arange(total)
    return out


def decode_block_run(blocks: Sequence[memoryview], budget: int) -> BlockRun | None:
    """Every entry of ``blocks`` (data blocks' contents, checked by their trailers), in order,
    as :class:`BlockRun`; None where the result might differ from decoding entry by entry
    (which the caller then does) or the keys would expand past ``budget`` bytes."""
    datas: list[bytes] = []
    lane_starts: list[np.ndarray] = []
    lane_ends: list[np.ndarray] = []
    lane_blocks: list[np.ndarray] = []
    base = 0
    try:
        for b, block in enumerate(blocks):
            data, restarts = split_block(block)
            if not data:
                continue  # no entries, whatever its restart points say
            at = np.array(restarts, dtype=np.int64)
            if at[0] != 0 or at[-1] >= len(data) or (len(at) > 1 and (np.diff(at) <= 0).any()):
                return None
            datas.append(data)
            # A run ends where the next one starts, or where its block's entries end.
            lane_starts.append(at + base)
            lane_ends.append(np.append(at[1:], len(data)) + base)
            lane_blocks.append(np.full(len(at), b, dtype=np.int64))
            base += len(data)
    except DecodeError:
        return None  # the entry-by-entry parse raises it, after what comes before it
    counts = [0] * len(blocks)
    if not datas:
        zero = np.zeros(1, dtype=np.int64)
        return BlockRun(bytearray(), zero, bytearray(), zero.copy(), counts)
    buf = np.frombuffer(b"".join([*datas, bytes(_PAD)]), dtype=np.uint8)
    del datas
    starts = np.concatenate(lane_starts)
    ends = np.concatenate(lane_ends)
    block_of = np.concatenate(lane_blocks)
    steps = _step_through(buf, starts, ends)
    if steps is None:
        return None
    return _assemble(buf, starts, steps, block_of, counts, budget)


@dataclass
class _Step:
    lanes: np.ndarray
    shared: np.ndarray
    non_shared: np.ndarray
    key_start: np.ndarray
    value_start: np.ndarray
    value_end: np.ndarray


def _step_through(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[_Step] | None:
    """Decode the ``s``-th entry of every run at step ``s``; None on anything the
    entry-by-entry parse might read otherwise."""
    pos = starts.copy()
    key_len = np.zeros(len(starts), dtype=np.int64)
    lanes = np.arange(len(starts))
    steps: list[_Step] = []
    while len(lanes):
        if len(steps) == MAX_RUN:
            return None
        at = pos[lanes]
        shared = _varint(buf, at)
        if shared is None:
            return None
        non_shared = _varint(buf, at + shared[1])
        if non_shared is None:
            return None
        value_len = _varint(buf, at + shared[1] + non_shared[1])
        if value_len is None:
            return None
        key_start = at + shared[1] + non_shared[1] + value_len[1]
        value_start = key_start + non_shared[0]
        value_end = value_start + value_len[0]
        stop = ends[lanes]
        if (value_end > stop).any():
            return None  # past its run: in the block, maybe, but not where the runs say
        limit = key_len[lanes] if steps else 0  # a run's first entry shares nothing
        if (shared[0] > limit).any():
            return None
        key_len[lanes] = shared[0] + non_shared[0]
        pos[lanes] = value_end
        steps.append(_Step(lanes, shared[0], non_shared[0], key_start, value_start, value_end))
        lanes = lanes[value_end < stop]
    return steps


def _assemble(
    buf: np.ndarray,
    starts: np.ndarray,
    steps: list[_Step],
    block_of: np.ndarray,
    counts: list[int],
    budget: int,
) -> BlockRun | None:
    per_lane = np.zeros(len(starts), dtype=np.int64)
    for step in steps:
        per_lane[step.lanes] += 1
    first = np.zeros(len(starts), dtype=np.int64)
    np.cumsum(per_lane[:-1], out=first[1:])
    n = int(per_lane.sum())
    shared = np.empty(n, dtype=np.int64)
    non_shared = np.empty(n, dtype=np.int64)
    key_start = np.empty(n, dtype=np.int64)
    value_start = np.empty(n, dtype=np.int64)
    value_end = np.empty(n, dtype=np.int64)
    where: list[np.ndarray] = []  # the entries of each step, in file order
    for s, step in enumerate(steps):
        at = first[step.lanes] + s
        where.append(at)
        shared[at] = step.shared
        non_shared[at] = step.non_shared
        key_start[at] = step.key_start
        value_start[at] = step.value_start
        value_end[at] = step.value_end
    key_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(shared + non_shared, out=key_offsets[1:])
    if int(key_offsets[-1]) > budget:
        return None  # the entry-by-entry parse raises the key bomb where it passes
    keys = bytearray(int(key_offsets[-1]))
    out = np.frombuffer(keys, dtype=np.uint8)
    out[_ranges(key_offsets[:-1] + shared, non_shared)] = buf[_ranges(key_start, non_shared)]
    for at in where[1:]:  # each key's shared prefix, from the key before it (done a step ago)
        out[_ranges(key_offsets[at], shared[at])] = out[_ranges(key_offsets[at - 1], shared[at])]
    later = np.concatenate(where[1:]) if len(where) > 1 else np.zeros(0, dtype=np.int64)
    if not _increasing(out, key_offsets, shared, non_shared, later):
        del out
        return None
    # Across runs: the first key of each run against the last of the one before.
    del out  # (keys is compared below as bytes)
    heads = first[1:].tolist()  # every run holds an entry
    offsets = key_offsets.tolist()
    for i in heads:
        if not keys[offsets[i - 1] : offsets[i]] < keys[offsets[i] : offsets[i + 1]]:
            return None
    value_lengths = value_end - value_start
    value_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(value_lengths, out=value_offsets[1:])
    values = bytearray(int(value_offsets[-1]))
    np.frombuffer(values, dtype=np.uint8)[:] = buf[_ranges(value_start, value_lengths)]
    for b, count in zip(block_of.tolist(), per_lane.tolist(), strict=True):
        counts[b] += count
    return BlockRun(keys, key_offsets, values, value_offsets, counts)


def _increasing(
    out: np.ndarray,
    key_offsets: np.ndarray,
    shared: np.ndarray,
    non_shared: np.ndarray,
    later: np.ndarray,
) -> bool:
    """Whether each entry at ``later`` (not the first of its run) is greater than the one
    before it, as their shared prefix shows: its delta is not empty, and where the entry
    before goes on, the delta's first byte is greater than that one's next byte."""
    if not len(later):
        return True
    if (non_shared[later] == 0).any():
        return False  # equal to the key before, or a prefix of it: not greater
    prefix = shared[later]
    before_len = key_offsets[later] - key_offsets[later - 1]
    goes_on = prefix < before_len
    mine = out[key_offsets[later][goes_on] + prefix[goes_on]]
    theirs = out[key_offsets[later - 1][goes_on] + prefix[goes_on]]
    return bool((mine > theirs).all())

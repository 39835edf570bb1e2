"""decode_block_run (a run of data blocks decoded with NumPy, restart run by restart run)
against the entry-by-entry parse: on valid blocks of any restart interval, key and value length
(one- and multi-byte varints), it answers, and equals block_entries_into; on damaged or hostile
blocks it answers only what the entry-by-entry parse answers, and LazyTable.packed_pieces
answers (or refuses) the same with and without it, whatever bytes the blocks hold."""

from __future__ import annotations

import struct
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyckpt.codecs import DecodeError, table_lookup
from anyckpt.codecs.crc import crc32c, mask
from anyckpt.codecs.table import (
    BlockBuilder,
    BlockHandle,
    TableBuilder,
    block_entries,
    block_entries_into,
    read_index_block,
    read_table,
)
from anyckpt.codecs.table_columns import MAX_RUN, BlockRun, decode_block_run
from anyckpt.codecs.table_lookup import LazyTable

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = st.binary(max_size=12) | st.binary(min_size=120, max_size=300)
VALUES = st.binary(max_size=20) | st.binary(min_size=125, max_size=300)
SORTED = st.lists(st.tuples(KEYS, VALUES), unique_by=lambda kv: kv[0]).map(sorted)


def _entries(run: BlockRun) -> list[tuple[bytes, bytes]]:
    return [
        (run.key(i), bytes(run.values[run.value_offsets[i] : run.value_offsets[i + 1]]))
        for i in range(len(run))
    ]


def _one_by_one(blocks: list[bytes], budget: int) -> list[tuple[bytes, bytes]]:
    keys: list[bytes] = []
    values: list[bytes] = []
    for block in blocks:
        budget -= block_entries_into(memoryview(block), keys, values, "data", budget)
    return list(zip(keys, values, strict=True))


def _blocks(entries: list[tuple[bytes, bytes]], interval: int, per_block: int) -> list[bytes]:
    out = []
    for lo in range(0, len(entries), per_block):
        builder = BlockBuilder(restart_interval=interval)
        for key, value in entries[lo : lo + per_block]:
            builder.add(key, value)
        out.append(builder.finish())
    return out or [BlockBuilder().finish()]


@FAST
@given(
    entries=SORTED,
    interval=st.sampled_from([1, 2, 16, MAX_RUN]),
    per_block=st.sampled_from([1, 3, 50, 1000]),
)
def test_valid_blocks_decode_as_entry_by_entry(
    entries: list[tuple[bytes, bytes]], interval: int, per_block: int
) -> None:
    blocks = _blocks(entries, interval, per_block)
    run = decode_block_run([memoryview(b) for b in blocks], 1 << 40)
    assert run is not None  # what our writer and TensorFlow's write takes the fast path
    assert _entries(run) == _one_by_one(blocks, 1 << 40) == entries
    assert run.counts == [len(list(block_entries(memoryview(b), "data"))) for b in blocks]
    assert run.key_bytes == sum(len(k) for k, _ in entries)


def test_longer_restart_runs_and_a_small_budget_are_left_to_the_caller() -> None:
    entries = [(b"k%05d" % i, b"v") for i in range(MAX_RUN + 1)]
    block = memoryview(_blocks(entries, MAX_RUN + 1, len(entries))[0])
    assert decode_block_run([block], 1 << 40) is None  # a run longer than MAX_RUN
    short = memoryview(_blocks(entries, 16, len(entries))[0])
    total = sum(len(k) for k, _ in entries)
    assert decode_block_run([short], total) is not None
    assert decode_block_run([short], total - 1) is None  # the caller raises the key bomb


def test_a_prefix_shared_less_than_it_could_be_is_left_to_the_caller() -> None:
    """Keys ``ab`` then ``ac`` written sharing nothing (valid, not what writers do): the first
    differing byte is not where the delta starts, so order is not shown by one byte."""
    body = bytes([0, 2, 1]) + b"ab" + b"x" + bytes([0, 2, 1]) + b"ac" + b"y"
    block = body + struct.pack("<II", 0, 1)
    assert _one_by_one([block], 1 << 40) == [(b"ab", b"x"), (b"ac", b"y")]
    assert decode_block_run([memoryview(block)], 1 << 40) is None


@FAST
@given(
    entries=SORTED.filter(bool),
    interval=st.sampled_from([1, 4, 16]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_damaged_blocks_answer_only_what_entry_by_entry_answers(
    entries: list[tuple[bytes, bytes]], interval: int, edits: list[tuple[int, int]]
) -> None:
    blocks = _blocks(entries, interval, 40)
    which = edits[0][0] % len(blocks)
    damaged = bytearray(blocks[which])
    for at, byte in edits:
        damaged[at % len(damaged)] = byte
    blocks[which] = bytes(damaged)
    try:
        expected: list[tuple[bytes, bytes]] | None = _one_by_one(blocks, 1 << 40)
    except DecodeError:
        expected = None
    try:
        run = decode_block_run([memoryview(b) for b in blocks], 1 << 40)
    except DecodeError:  # pragma: no cover - it must not raise: the caller names the error
        pytest.fail("decode_block_run raised instead of leaving the block to the caller")
    if run is not None:
        assert expected is not None
        assert _entries(run) == expected


def _with_damaged_block(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """``data`` with bytes of one data block changed and its trailer's checksum made to
    match (so the damage reaches the entry parser, as a crafted file's would)."""
    handles = [BlockHandle.decode(h)[0] for _, h in block_entries(read_index_block(data), "index")]
    if not handles:
        return data
    handle = handles[edits[0][0] % len(handles)]
    out = bytearray(data)
    for at, byte in edits:
        out[handle.offset + at % handle.size] = byte
    contents = out[handle.offset : handle.offset + handle.size]
    type_byte = out[handle.offset + handle.size]
    checksum = mask(crc32c(bytes([type_byte]), crc32c(bytes(contents))))
    struct.pack_into("<I", out, handle.offset + handle.size + 1, checksum)
    return bytes(out)


def _packed(data: bytes, *, fast: bool) -> list[tuple[bytes, bytes]] | None:
    """LazyTable.packed_pieces' entries (None if it raises), with the NumPy run decoder or
    with every block left to the entry-by-entry parse."""
    never = lambda blocks, budget: None  # noqa: E731
    with mock.patch.object(table_lookup, "decode_block_run", decode_block_run if fast else never):
        try:
            pieces = list(LazyTable(data).packed_pieces(min_entries=7))
        except DecodeError:
            return None
    return [(p.key(i), p.value(i)) for p in pieces for i in range(len(p))]


@FAST
@given(
    entries=SORTED,
    block_size=st.sampled_from([1, 64, 4096]),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3),
)
def test_packed_of_crafted_blocks_agrees_with_the_entry_by_entry_path(
    entries: list[tuple[bytes, bytes]], block_size: int, edits: list[tuple[int, int]]
) -> None:
    builder = TableBuilder(block_size=block_size)
    for key, value in entries:
        builder.add(key, value)
    data = builder.finish()
    if edits:
        data = _with_damaged_block(data, edits)
    fast = _packed(data, fast=True)
    assert fast == _packed(data, fast=False)
    if not edits:
        assert fast == entries
    elif fast is not None:  # LazyTable checks more than read_table (each block's key range)
        assert fast == read_table(data)

"""Builders of crafted checkpoint files (issue 13): small files that expand enormously when read
naively. Used by the regression tests and by ``benchmarks/hostile_cases.py``.

Each builder writes its files under a prefix and returns the prefix; the files are valid in
every other respect (checksums, handles, order), so only the expansion itself can refuse them.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from pathlib import Path

from anyckpt.codecs import v1 as v1_codec
from anyckpt.codecs.bundle import BundleEntry, encode_entry, encode_header
from anyckpt.codecs.crc import masked_crc32c
from anyckpt.codecs.table import (
    BlockBuilder,
    BlockHandle,
    block_trailer,
    footer,
    short_successor,
)

DT_FLOAT = 1  # types.proto

#: A restart interval no honest writer uses: one restart run holds every entry.
ONE_RUN = 1 << 62


def _table(blocks: list[Iterable[tuple[bytes, bytes]]], index_interval: int = 1) -> bytes:
    """A table of the given data blocks (each sorted (key, value) pairs, written as one
    restart run; generated, so the expanded keys are never all in memory) whose index block
    uses ``index_interval``."""
    out = bytearray()
    handles: list[tuple[bytes, BlockHandle]] = []
    for entries in blocks:
        builder = BlockBuilder(restart_interval=ONE_RUN)
        key = b""
        for key, value in entries:
            builder.add(key, value)
        contents = builder.finish()
        handles.append((short_successor(key), BlockHandle(len(out), len(contents))))
        out += contents + block_trailer(contents)
    return _finish(out, handles, index_interval)


def _finish(
    out: bytearray, handles: Iterable[tuple[bytes, BlockHandle]], index_interval: int
) -> bytes:
    meta = BlockBuilder().finish()
    metaindex = BlockHandle(len(out), len(meta))
    out += meta + block_trailer(meta)
    index_block = BlockBuilder(restart_interval=index_interval)
    for separator, handle in handles:
        index_block.add(separator, handle.encode())
    contents = index_block.finish()
    index = BlockHandle(len(out), len(contents))
    out += contents + block_trailer(contents)
    out += footer(metaindex, index)
    return bytes(out)


def v2_prefix_bomb(directory: Path, count: int = 50_000, prefix_len: int = 10_000) -> str:
    """A V2 checkpoint whose ``count`` keys share a ``prefix_len``-byte prefix in one restart
    run: the index is ~20 bytes per key, the keys expand to ``count × prefix_len`` bytes.
    Every entry is a valid float32 scalar (the same 4 bytes of the data file)."""
    prefix = str(directory / "bomb")
    data = bytes(4)
    value = encode_entry(BundleEntry(DT_FLOAT, (), 0, 0, 4, masked_crc32c(data)))
    stem = b"k" * prefix_len
    entries = chain([(b"", encode_header(1))], ((stem + b"%08d" % i, value) for i in range(count)))
    Path(prefix + ".index").write_bytes(_table([entries]))
    Path(prefix + ".data-00000-of-00001").write_bytes(data)
    return prefix


def v1_separator_bomb(directory: Path, count: int = 20_000, separator_len: int = 20_000) -> str:
    """A V1 file whose index block holds ``count`` separators of ``separator_len`` bytes in one
    restart run (each stored as a few bytes); the data blocks behind them are tiny. The first
    block holds a valid, empty meta."""
    path = directory / "bomb.ckpt"
    out = bytearray()
    first = BlockBuilder()
    first.add(v1_codec.META_KEY, v1_codec.encode_meta([]))
    contents = first.finish()
    out += contents + block_trailer(contents)
    filler = BlockBuilder().finish()  # an empty block: 8 bytes (+ 5 of trailer)
    start, step = len(out), len(filler) + len(block_trailer(filler))
    out += (filler + block_trailer(filler)) * count
    stem = b"s" * separator_len
    handles = chain(
        [(b"", BlockHandle(0, len(contents)))],
        ((stem + b"%08d" % i, BlockHandle(start + i * step, len(filler))) for i in range(count)),
    )
    path.write_bytes(_finish(out, handles, ONE_RUN))
    return str(path)

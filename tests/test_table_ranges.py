"""A table built a range of data blocks at a time (TableBuild) is byte for byte the table
TableBuilder writes, whatever the range size; only one range's values are made at once; an
index written piece by piece is the index built whole."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.codecs.packed import Column, HeadedBytes, PackedBytes, bytes_column
from anyckpt.codecs.table import TableBuilder, read_table
from anyckpt.codecs.table_packed import TableBuild, build_table_with_layout, replace_value_tails
from anyckpt.formats import v2_index
from anyckpt.formats.v2_data import DataFileEntries
from anyckpt.formats.v2_index import build_index, write_index
from anyckpt.storage import Storage
from anyckpt.tensors import stored_key_order


def _reference(keys: list[bytes], values: list[bytes], block_size: int) -> bytes:
    builder = TableBuilder(block_size=block_size)
    for key, value in zip(keys, values, strict=True):
        builder.add(key, value)
    return builder.finish()


def _ranged(
    keys: list[bytes] | PackedBytes,
    values: list[bytes],
    block_size: int,
    range_entries: int,
    asked: list[tuple[int, int]] | None = None,
) -> tuple[list[bytes], TableBuild]:
    """The pieces of the table built ``range_entries`` at a time, each range's values made
    on demand (the ranges asked for recorded in ``asked``)."""
    column = bytes_column(values)

    def values_of(low: int, high: int) -> Column:
        if asked is not None:
            asked.append((low, high))
        return bytes_column(values[low:high])

    source = values_of if asked is not None else column
    build = TableBuild(keys, source, block_size=block_size, range_entries=range_entries)
    return list(build.pieces()), build


keys_strategy = st.lists(
    st.one_of(st.binary(max_size=12), st.text("ab\x00", max_size=20).map(str.encode)),
    unique=True,
    max_size=150,
).map(sorted)


@settings(max_examples=300, deadline=None)
@given(
    keys_strategy,
    st.data(),
    st.sampled_from([1, 7, 64, 300, 4096]),
    st.integers(1, 40),
)
def test_ranges_give_the_one_shot_table(
    keys: list[bytes], data: st.DataObject, block_size: int, range_entries: int
) -> None:
    values = [data.draw(st.binary(max_size=150)) for _ in keys]
    expected = _reference(keys, values, block_size)
    asked: list[tuple[int, int]] = []
    pieces, build = _ranged(keys, values, block_size, range_entries, asked)
    assert b"".join(pieces) == expected
    assert build.size == len(expected)
    assert read_table(b"".join(pieces)) == list(zip(keys, values, strict=True))
    # Each range starts where the last whole block of the one before ended.
    assert all(low < high for low, high in asked)
    if keys:
        assert asked[0][0] == 0
        assert asked[-1][1] == len(keys)
    # The layout is the one-shot build's.
    _, layout = build_table_with_layout(keys, bytes_column(values), block_size=block_size)
    assert build.layout is not None
    assert build.layout.data_blocks == layout.data_blocks
    assert np.array_equal(build.layout.entry_ends, layout.entry_ends)


def test_small_blocks_make_one_range_of_values_at_a_time() -> None:
    """Blocks much smaller than a range: no range of values is made larger than asked, and
    the ranges together cover each entry about once (a block's worth made twice)."""
    keys = [b"model/layer_%05d/kernel" % i for i in range(5000)]
    values = [b"v" * (i % 40) for i in range(len(keys))]
    asked: list[tuple[int, int]] = []
    pieces, _ = _ranged(keys, values, 512, 300, asked)
    assert b"".join(pieces) == _reference(keys, values, 512)
    assert max(high - low for low, high in asked) <= 300
    assert sum(high - low for low, high in asked) < 1.3 * len(keys)
    assert len(pieces) == len(asked) + 1  # a piece per range, then the index and footer


def test_a_block_longer_than_a_range_widens_it() -> None:
    """Values so long that a block holds more entries than a range: the range doubles until
    it holds a whole block, the same table comes out."""
    keys = [b"k%04d" % i for i in range(400)]
    values = [b"x" * 3] * len(keys)
    asked: list[tuple[int, int]] = []
    pieces, _ = _ranged(keys, values, 4096, 4, asked)
    assert b"".join(pieces) == _reference(keys, values, 4096)
    assert max(high - low for low, high in asked) > 4


def test_packed_keys_across_ranges_and_unsorted_neighbours() -> None:
    keys = sorted(b"n/%d/%s" % (i % 17, b"q" * (i % 9)) + b"%d" % i for i in range(2000))
    values = [b"%d" % i for i in range(len(keys))]
    packed = PackedBytes.join(keys, len(keys), increasing=True)
    pieces, _ = _ranged(packed, values, 256, 50)
    assert b"".join(pieces) == _reference(keys, values, 256)
    # Two equal names on either side of a range boundary are still refused.
    twice = [*keys[:100], keys[99], *keys[100:200]]
    claimed = PackedBytes.join(twice, len(twice), increasing=True)
    with pytest.raises(ValueError, match="strictly increase"):
        _ranged(claimed, [b""] * len(twice), 64, 1)  # each range one entry


def test_packed_bytes_part_is_a_view() -> None:
    items = [b"a", b"", b"bcd", b"e"]
    packed = PackedBytes.join(items, len(items), increasing=True)
    part = packed.part(1, 3)
    assert list(part) == items[1:3]
    assert part.data is packed.data
    assert part.increasing
    assert np.shares_memory(part.starts, packed.starts)


def test_value_tails_replaced_in_pieces_or_whole() -> None:
    keys = [b"t%04d" % i for i in range(600)]
    values = [b"head" + bytes([i % 256]) * 4 for i in range(len(keys))]
    pieces, build = _ranged(keys, values, 300, 64)
    layout = build.layout
    assert layout is not None
    assert layout.entry_ends.dtype == np.int32  # 4 bytes an entry below 2 GiB
    entries = np.arange(0, len(keys), 7)
    tails = np.full((len(entries), 4), 0xAB, np.uint8)
    whole = replace_value_tails(b"".join(pieces), layout, entries, tails)
    assert replace_value_tails(pieces, layout, entries, tails) == whole
    changed = [v[:-4] + b"\xab" * 4 if i % 7 == 0 else v for i, v in enumerate(values)]
    assert whole == _reference(keys, changed, 300)


def _entries(count: int) -> DataFileEntries:
    names = tuple(f"layer{i // 10}/w{i % 10}" for i in range(count))
    packed, _ = stored_key_order(names)
    sizes = np.full(count, 16, np.int64)
    offsets = np.arange(count, dtype=np.int64) * 16
    crcs = (np.arange(count, dtype=np.uint32) * 2654435761 + 1).astype(np.uint32)
    kind_ids = np.zeros(count, np.int32)
    return DataFileEntries(0, packed, kind_ids, [(1, (4,))], offsets, sizes, crcs)


@pytest.mark.parametrize("url", ["local", "memory://ranges"])
def test_index_written_in_pieces_is_the_index_built_whole(
    tmp_path: os.PathLike[str], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_RANGE_ENTRIES", 500)  # many pieces
    v2_index._TEMPLATES.clear()
    entries = _entries(20_000)
    whole = build_index(1, [entries])
    v2_index._TEMPLATES.clear()
    base = str(tmp_path) if url == "local" else url
    storage, root = Storage.from_url(base)
    path = f"{root}/c.index"
    write_index(storage, path, 1, [entries], durable=False)
    assert storage.read_bytes(path) == whole
    # The template kept while writing in pieces patches to a fresh build.
    crcs = entries.crcs + np.uint32(5)
    again = dataclasses.replace(entries, crcs=crcs)
    patched = build_index(1, [again])
    v2_index._TEMPLATES.clear()
    assert patched == build_index(1, [again])


def test_a_table_too_large_to_keep_as_a_template_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_RANGE_ENTRIES", 500)
    monkeypatch.setattr(v2_index, "_TEMPLATE_MAX_BYTES", 64 << 10)
    v2_index._TEMPLATES.clear()
    built = build_index(1, [_entries(20_000)])  # ~500 kB: over the limit after a few pieces
    assert len(built) > 2 * (64 << 10)
    assert len(v2_index._TEMPLATES) == 0
    build_index(1, [_entries(500)])
    assert len(v2_index._TEMPLATES) == 1


def test_a_failing_piece_leaves_no_file(tmp_path: os.PathLike[str]) -> None:
    storage, root = Storage.from_url(str(tmp_path))

    def pieces() -> Iterator[bytes]:
        yield b"abc"
        raise RuntimeError("made no more")

    with pytest.raises(RuntimeError, match="no more"):
        storage.write_pieces(f"{root}/x.index", pieces(), durable=False)
    assert os.listdir(tmp_path) == []


def test_one_file_index_is_written_on_the_data_file_s_thread(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-file save writes its index on the thread that wrote its data file (one malloc
    arena for both phases); a sharded one writes it after every data file."""
    import threading

    import anyckpt.sync
    from anyckpt.formats import v2

    seen: dict[str, list[int]] = {"data": [], "index": []}
    write_data, write_index_file = v2.write_data_file, v2.write_index_file

    def data(*args: object, **kwargs: object) -> DataFileEntries:
        seen["data"].append(threading.get_ident())
        return write_data(*args, **kwargs)  # type: ignore[arg-type]

    def index(*args: object, **kwargs: object) -> None:
        seen["index"].append(threading.get_ident())
        write_index_file(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(v2, "write_data_file", data)
    monkeypatch.setattr(v2, "write_index_file", index)
    state = {f"k{i:05d}": np.full(3, i, np.float32) for i in range(5000)}
    anyckpt.sync.save(os.path.join(tmp_path, "one"), state, durable=False)
    assert seen["index"] == seen["data"]
    assert len(seen["data"]) == 1
    seen["data"].clear()
    seen["index"].clear()
    anyckpt.sync.save(
        os.path.join(tmp_path, "three"), state, durable=False, options={"num_shards": 3}
    )
    assert len(seen["data"]) == 3
    assert len(seen["index"]) == 1
    assert anyckpt.sync.load(os.path.join(tmp_path, "one")).keys() == state.keys()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.binary(max_size=8), unique=True, max_size=40).map(sorted),
    st.binary(max_size=3),
    st.data(),
)
def test_headed_bytes_is_with_first(items: list[bytes], first: bytes, data: st.DataObject) -> None:
    packed = PackedBytes.join(items, len(items), increasing=True)
    headed = HeadedBytes(first, packed)
    eager = packed.with_first(first)
    assert len(headed) == len(eager)
    assert list(headed) == list(eager) == [first, *items]
    assert headed.increasing == eager.increasing
    assert headed[-1] == eager[-1]
    low = data.draw(st.integers(0, len(headed)))
    high = data.draw(st.integers(low, len(headed)))
    part = headed.part(low, high)
    assert list(part) == [first, *items][low:high]
    if part.increasing:  # claimed only when so
        assert all(a < b for a, b in itertools.pairwise(part))
    if first == b"" or low > 0 or high == 0:
        assert part.data is packed.data  # no copy of the buffer
    else:
        assert len(part.data) == sum(map(len, part))  # only the range's bytes


@pytest.mark.parametrize("first", [b"", b"!"])
def test_headed_keys_build_the_with_first_table(first: bytes) -> None:
    keys = sorted(b"h/%d/%s" % (i % 11, b"z" * (i % 5)) + b"%d" % i for i in range(1500))
    packed = PackedBytes.join(keys, len(keys), increasing=True)
    values = bytes_column([b"%d" % i for i in range(len(keys) + 1)])
    headed = TableBuild(HeadedBytes(first, packed), values, block_size=256, range_entries=70)
    expected = _reference([first, *keys], [b"%d" % i for i in range(len(keys) + 1)], 256)
    assert b"".join(headed.pieces()) == expected


def test_a_table_found_too_large_while_built_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long names: the lower bound (which counts no name bytes) lets the template be
    gathered, and it is dropped once the table outgrows the limit; the bytes are the same."""
    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_RANGE_ENTRIES", 100)
    monkeypatch.setattr(v2_index, "_TEMPLATE_MAX_BYTES", 256 << 10)
    count = 2000
    names = tuple(f"{i:05d}/" + "n" * 300 for i in range(count))
    packed, _ = stored_key_order(names)
    entries = dataclasses.replace(_entries(count), keys=packed)
    v2_index._TEMPLATES.clear()
    assert not v2_index._surely_too_large(entries, [b"\x08\x01"])
    built = build_index(1, [entries])
    assert len(built) > (256 << 10)
    assert len(v2_index._TEMPLATES) == 0
    monkeypatch.setattr(v2_index, "_TEMPLATE_MAX_BYTES", 16 << 20)
    assert build_index(1, [entries]) == built
    assert len(v2_index._TEMPLATES) == 1


def test_collector_paused_only_while_a_piece_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_RANGE_ENTRIES", 500)
    v2_index._TEMPLATES.clear()
    assert gc.isenabled()
    pieces = v2_index.index_pieces(1, [_entries(5000)])
    first = next(pieces)
    assert gc.isenabled()  # between pieces: the caller writes with the collector on
    assert len(first) > 0
    del pieces  # stopped early
    assert gc.isenabled()


def test_ranges_are_sized_from_the_blocks_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks much larger than the smallest range: after the first, each range is made
    for _RANGE_BLOCKS blocks and a little more, so the entries made twice (those after a
    range's last whole block) stay a small share; the module default is read at build time."""
    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_RANGE_ENTRIES", 40)
    keys = [b"model/layer_%05d/kernel" % i for i in range(6000)]
    values = [b"value-%04d" % (i % 1000) for i in range(len(keys))]
    asked: list[tuple[int, int]] = []
    column = bytes_column(values)

    def values_of(low: int, high: int) -> Column:
        asked.append((low, high))
        return Column(column.data, column.starts[low:high], column.lengths[low:high])

    build = TableBuild(keys, values_of, block_size=4096)
    assert b"".join(build.pieces()) == _reference(keys, values, 4096)
    assert asked[0] == (0, 40)  # the module's default, as patched
    block = len(keys) / len(build.layout.data_blocks)  # type: ignore[union-attr]
    later = [high - low for low, high in asked if low > 0][:-1]  # (the first doubles)
    assert all(n > table_packed._RANGE_BLOCKS * block * 0.9 for n in later)
    assert sum(high - low for low, high in asked) < 1.25 * len(keys)


def test_next_range() -> None:
    from anyckpt.codecs.table_packed import _RANGE_BLOCKS, _next_range

    assert _next_range(1000, 10, 1) == int(100 * (_RANGE_BLOCKS + 0.125)) + 1
    assert _next_range(1000, 10, 5000) == 5000

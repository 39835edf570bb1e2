"""Lazy lookups in a table (codecs/table_lookup.py) and the V2 reader built on them: every key
is found, every missing key is not, hostile blocks raise DecodeError, and inconsistent entries
are reported when first used."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.codecs import DecodeError
from anyckpt.codecs.bundle import BundleEntry, encode_entry, encode_header
from anyckpt.codecs.crc import crc32c, mask, masked_crc32c
from anyckpt.codecs.table import MAGIC, BlockHandle, TableBuilder, build_table, read_table
from anyckpt.codecs.table_lookup import LazyTable

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK_SIZES = st.sampled_from([1, 16, 64, 256, 4096, 256 * 1024])


def build(entries: list[tuple[bytes, bytes]], block_size: int) -> bytes:
    builder = TableBuilder(block_size=block_size)
    for key, value in entries:
        builder.add(key, value)
    return builder.finish()


def sorted_entries(max_entries: int = 300) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    keys = st.binary(max_size=10) | st.lists(
        st.sampled_from([0x00, 0x01, 0x61, 0x62, 0xFF]), max_size=10
    ).map(bytes)
    return st.lists(
        st.tuples(keys, st.binary(max_size=20)), max_size=max_entries, unique_by=lambda kv: kv[0]
    ).map(sorted)


def neighbours(key: bytes) -> list[bytes]:
    """Keys next to ``key`` in bytewise order: the likeliest to be confused with it."""
    out = [key + b"\0", key + b"\xff", key[:-1]]
    if key:
        last = key[-1]
        out += [key[:-1] + bytes([(last + 1) % 256]), key[:-1] + bytes([(last - 1) % 256])]
    return out


@FAST
@given(entries=sorted_entries(), block_size=BLOCK_SIZES, probes=st.lists(st.binary(max_size=10)))
def test_lookups_find_every_key_and_no_other(
    entries: list[tuple[bytes, bytes]], block_size: int, probes: list[bytes]
) -> None:
    data = build(entries, block_size)
    table = LazyTable(data)
    stored = dict(entries)
    for key, value in entries:
        assert table.get(key) == value
    for key in [*probes, *(n for k, _ in entries for n in neighbours(k))]:
        assert table.get(key) == stored.get(key)
    assert table.first() == (entries[0] if entries else None)
    assert table.items() == read_table(data) == entries
    # After a full listing, lookups go through it and agree.
    assert table.as_dict() == stored
    for key in [*probes, *stored]:
        assert table.get(key) == stored.get(key)


def test_many_blocks_and_restart_points() -> None:
    """Blocks of several restart intervals (16 entries each), several blocks."""
    entries = [(b"layer_%04d/kernel" % i, b"v%d" % i) for i in range(2000)]
    data = build(entries, 1024)
    table = LazyTable(data)
    assert len(table._handles) > 20
    assert all(len(table._block(i).restarts) > 2 for i in range(len(table._handles) - 1))
    for key, value in entries[::7]:
        assert table.get(key) == value
    assert table.get(b"layer_0000") is None
    assert table.get(b"layer_9999/kernel") is None
    assert table.get(b"") is None


@FAST
@given(
    entries=st.lists(
        st.tuples(st.binary(min_size=1, max_size=200), st.binary(max_size=200)),
        min_size=1,
        max_size=120,
        unique_by=lambda kv: kv[0],
    ).map(sorted),
    block_size=st.sampled_from([64, 1024, 256 * 1024]),
)
def test_first_and_later_lookups_of_a_block_agree(
    entries: list[tuple[bytes, bytes]], block_size: int
) -> None:
    """A block's first lookup searches its restart points one decoded key at a time, later
    ones all its restart keys at once (sliced with NumPy, or decoded one by one when a key
    or value is 128 bytes or longer): every key and its neighbours are found alike."""
    table = LazyTable(build(entries, block_size))
    stored = dict(entries)
    probes = [k for key, _ in entries for k in [key, *neighbours(key)]]
    first = [table.get(k) for k in probes]
    assert first == [stored.get(k) for k in probes]
    assert [table.get(k) for k in reversed(probes)] == first[::-1]


# -- hostile tables: valid checksums around crafted bytes ----------------------------------


def _trailer(contents: bytes) -> bytes:
    return contents + b"\0" + struct.pack("<I", mask(crc32c(b"\0", crc32c(contents))))


def table_of_blocks(blocks: list[tuple[bytes, bytes]]) -> bytes:
    """A table whose data blocks are the given raw contents (under the given separators),
    every checksum correct: only the block parser stands between these bytes and a crash."""
    out = bytearray()
    index = bytearray()
    restarts = []
    for separator, contents in blocks:
        handle = BlockHandle(len(out), len(contents))
        out += _trailer(contents)
        restarts.append(len(index))
        value = handle.encode()
        index += bytes([0, len(separator), len(value)]) + separator + value
    index += b"".join(struct.pack("<I", r) for r in restarts or [0])
    index += struct.pack("<I", len(restarts or [0]))
    meta = BlockHandle(len(out), 8)
    out += _trailer(struct.pack("<II", 0, 1))
    index_handle = BlockHandle(len(out), len(index))
    out += _trailer(bytes(index))
    footer = meta.encode() + index_handle.encode()
    out += footer + bytes(40 - len(footer)) + struct.pack("<Q", MAGIC)
    return bytes(out)


def test_table_of_blocks_helper_builds_what_the_builder_builds() -> None:
    entries = [(b"a", b"1"), (b"b", b"2")]
    real = build(entries, 1 << 20)
    contents = LazyTable(real)._block(0)
    raw = contents.data + b"".join(struct.pack("<I", r) for r in contents.restarts)
    raw += struct.pack("<I", len(contents.restarts))
    crafted = table_of_blocks([(b"c", raw)])
    assert LazyTable(crafted).items() == entries
    assert read_table(crafted) == entries


@FAST
@given(
    contents=st.binary(min_size=4, max_size=200),
    restarts=st.lists(st.integers(0, 220), min_size=1, max_size=6),
    probes=st.lists(st.binary(max_size=6), min_size=1, max_size=8),
)
def test_crafted_blocks_raise_only_decode_error(
    contents: bytes, restarts: list[int], probes: list[bytes]
) -> None:
    blocks = [
        (b"\xff" * 8, contents),
        (
            b"\xff" * 9,
            contents
            + b"".join(struct.pack("<I", r) for r in restarts)
            + struct.pack("<I", len(restarts)),
        ),
    ]
    for block in blocks:
        data = table_of_blocks([block])
        try:
            expected: list[tuple[bytes, bytes]] | None = read_table(data)
        except DecodeError:
            expected = None
        try:
            table = LazyTable(data)
        except DecodeError:
            continue
        # Lookups trust the restart points, as TensorFlow's do: on crafted ones they may miss
        # or misread a key, but stay inside the block and raise only DecodeError.
        for key in probes:
            with contextlib.suppress(DecodeError):
                table.get(key)
        try:
            items = table.items()
        except DecodeError:
            continue
        # What the full listing accepts, read_table accepts too, with the same entries.
        assert items == expected


@FAST
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        table = LazyTable(data + struct.pack("<Q", MAGIC) if len(data) > 48 else data)
        table.get(b"a")
        table.items()


def test_out_of_order_keys_are_caught_by_the_full_listing() -> None:
    good = build([(b"a", b"1"), (b"b", b"2")], 1 << 20)
    raw = bytearray(LazyTable(good)._block(0).data)
    raw[raw.index(b"b")] = ord("0")  # second key "0" < "a"
    block = bytes(raw) + struct.pack("<II", 0, 1)
    table = LazyTable(table_of_blocks([(b"c", block)]))
    with pytest.raises(DecodeError, match="out of order"):
        table.items()
    # A key beyond its block's separator.
    table = LazyTable(table_of_blocks([(b"a\x00", good_block(good))]))
    with pytest.raises(DecodeError, match="key range"):
        table.items()
    # Separators out of order.
    with pytest.raises(DecodeError, match="separator"):
        LazyTable(table_of_blocks([(b"c", good_block(good)), (b"b", good_block(good))]))


def good_block(table: bytes) -> bytes:
    block = LazyTable(table)._block(0)
    restarts = b"".join(struct.pack("<I", r) for r in block.restarts)
    return block.data + restarts + struct.pack("<I", len(block.restarts))


def test_a_restart_point_that_shares_a_prefix_is_corrupt() -> None:
    entries = [(b"k%02d" % i, b"") for i in range(40)]
    block = good_block(build(entries, 1 << 20))
    # Point the second restart at the second entry (which shares "k0" with the first).
    data, restarts = block[: -4 - 12], list(struct.unpack("<3I", block[-16:-4]))
    restarts[1] = 6
    crafted = data + struct.pack("<3I", *restarts) + struct.pack("<I", 3)
    table = LazyTable(table_of_blocks([(b"l", crafted)]))
    with pytest.raises(DecodeError, match="corrupt entry"):
        table.get(b"k20")


def test_every_block_checksum_is_checked_at_open() -> None:
    data = bytearray(build([(b"key%04d" % i, b"value") for i in range(300)], 256))
    table = LazyTable(bytes(data))
    for handle in table._handles:
        damaged = bytearray(data)
        damaged[handle.offset + handle.size // 2] ^= 0x10
        with pytest.raises(DecodeError, match="checksum"):
            LazyTable(bytes(damaged))


# -- the V2 reader ------------------------------------------------------------------------


def reblock(prefix: Path, block_size: int) -> None:
    """Rewrite a bundle's index with tiny blocks: the same entries over many blocks."""
    index = Path(f"{prefix}.index")
    index.write_bytes(build(read_table(index.read_bytes()), block_size))


STATE = {
    **{f"layer_{i:03d}/w": np.full((3, i % 5), i, dtype=np.float32) for i in range(120)},
    "strings": np.array([b"a", b"bc"], dtype=object),
    "part": anyckpt.Partitioned.split(np.arange(24, dtype=np.int64).reshape(6, 4), 3, axis=0),
    "\0zero-prefixed": np.int32(7),
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("lazy") / "c"
    anyckpt.sync.save(prefix, STATE, durable=False)
    reblock(prefix, 64)
    return prefix


def expected(key: str) -> np.ndarray:
    return np.asarray(STATE[key])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(st.sampled_from(sorted(STATE)), unique=True, max_size=12),
    missing=st.lists(st.text(max_size=8), max_size=4),
)
def test_reader_finds_every_subset(bundle: Path, keys: list[str], missing: list[str]) -> None:
    loaded = anyckpt.sync.load(bundle, keys)
    assert list(loaded) == keys
    for key in keys:
        assert np.array_equal(loaded[key], expected(key)), key
    with anyckpt.sync.open(bundle) as reader:
        for key in missing:
            if key in STATE:
                continue
            with pytest.raises(KeyError):
                reader.spec(key)
            with pytest.raises(KeyError):
                reader.read(key)


def test_reader_hides_slices_and_the_header(bundle: Path) -> None:
    table = LazyTable(Path(f"{bundle}.index").read_bytes())
    slice_keys = [k for k, _ in table.items() if k[:1] == b"\0" and k != b"\0zero-prefixed"]
    assert len(slice_keys) == 3
    with anyckpt.sync.open(bundle) as reader:
        for raw in [b"", *slice_keys]:
            with pytest.raises(KeyError):
                reader.spec(raw.decode("utf-8", "surrogateescape"))
        spec = reader.spec("part")
        assert len(spec.partitions) == 3
        assert spec.nbytes == 24 * 8
        assert reader.spec("\0zero-prefixed").shape == ()
        assert reader.keys() == sorted(STATE, key=lambda k: k.encode())
        # After the full listing, the same answers.
        for raw in [b"", *slice_keys]:
            with pytest.raises(KeyError):
                reader.spec(raw.decode("utf-8", "surrogateescape"))
    full = anyckpt.sync.load(bundle)
    assert list(full) == sorted(STATE, key=lambda k: k.encode())
    for key, value in full.items():
        assert np.array_equal(value, expected(key)), key


def test_a_bad_entry_spoils_only_its_own_lookups(tmp_path: Path) -> None:
    """Entries are checked at first use: a damaged one is refused (naming the index) when it
    is used or when everything is listed, and the others stay readable."""
    payload = np.arange(4, dtype="<f4").tobytes()
    good = BundleEntry(1, (4,), offset=0, size=16, crc32c=masked_crc32c(payload))
    bad = BundleEntry(1, (4,), offset=0, size=12)  # size disagrees with the shape
    entries = [(b"", encode_header(1))]
    entries += sorted((b"t%03d" % i, encode_entry(bad if i == 50 else good)) for i in range(100))
    prefix = tmp_path / "x"
    Path(f"{prefix}.index").write_bytes(build(entries, 128))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(payload)
    assert anyckpt.sync.load(prefix, ["t049", "t051"])["t051"].tolist() == [0, 1, 2, 3]
    for use in (lambda: anyckpt.sync.load(prefix), lambda: anyckpt.sync.load(prefix, ["t050"])):
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            use()
        assert exc.value.path == f"{prefix}.index"
        assert "'t050'" in str(exc.value)
    with anyckpt.sync.open(prefix) as reader:
        with pytest.raises(anyckpt.CorruptCheckpointError):
            reader.keys()
        with pytest.raises(anyckpt.CorruptCheckpointError):
            reader.spec("t050")


def test_default_blocks_match_build_table() -> None:
    entries = [(b"k%d" % i, b"v") for i in range(10)]
    assert LazyTable(build_table(entries)).items() == entries

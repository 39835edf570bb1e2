"""Damaged, truncated, crafted and missing checkpoints: the right error, naming the file, fast,
and never a huge allocation."""

from __future__ import annotations

import math
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import anyckpt
from anyckpt.codecs.bundle import (
    BundleEntry,
    decode_entry,
    encode_entry,
    encode_header,
)
from anyckpt.codecs.crc import masked_crc32c
from anyckpt.codecs.ordered_code import encode_tensor_name_slice
from anyckpt.codecs.table import FOOTER_SIZE, BlockHandle, build_table, read_table

VALUES = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "s": np.array([b"ab", b"", b"\xff\x00"], dtype=object),
    "b": np.int8(-3),
    "z": np.zeros((0, 2), dtype=np.int64),
}
DATA = "c.data-00000-of-00001"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def ckpt(tmp_path: Path) -> Path:
    prefix = tmp_path / "c"
    await anyckpt.save(prefix, VALUES, durable=False)
    return prefix


def assert_same(loaded: dict[str, np.ndarray]) -> None:
    assert set(loaded) == set(VALUES)
    for key, value in VALUES.items():
        got = loaded[key]
        assert got.dtype == np.asarray(value).dtype, key
        assert got.shape == np.shape(value), key
        if got.dtype == object:
            assert got.tolist() == value.tolist(), key
        else:
            assert got.tobytes() == np.asarray(value).tobytes(), key


def assert_names(exc: pytest.ExceptionInfo[anyckpt.CheckpointError], path: Path | str) -> None:
    """The message starts with the file's path, which is also on the exception."""
    assert str(exc.value).startswith(f"{path}: "), str(exc.value)
    assert exc.value.path == str(path)


def entries_of(prefix: Path) -> dict[str, BundleEntry]:
    table = read_table(Path(f"{prefix}.index").read_bytes())
    return {k.decode(): decode_entry(v) for k, v in table[1:]}


@contextmanager
def bounded(seconds: float = 2.0, max_bytes: int = 64 << 20) -> Iterator[None]:
    """Fails if the block takes longer than `seconds` or allocates more than `max_bytes`
    (NumPy reports its array buffers to tracemalloc)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, elapsed
    assert peak < max_bytes, peak


# -- the index ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_truncation_of_the_index(ckpt: Path) -> None:
    index = Path(f"{ckpt}.index")
    original = index.read_bytes()
    assert 100 < len(original) < 400
    for length in range(len(original)):
        index.write_bytes(original[:length])
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            await anyckpt.load(ckpt)
        assert_names(exc, index)
    index.write_bytes(original)
    assert_same(await anyckpt.load(ckpt))


@pytest.mark.anyio
async def test_every_bit_flip_in_the_index(ckpt: Path) -> None:
    """Each flip is caught, or lands where the reader (like TF's) never looks and the load is
    exactly the original: the metaindex block, which TF writes empty and never reads, the
    metaindex handle, and the footer's zero padding. Everything else is checked."""
    index = Path(f"{ckpt}.index")
    original = index.read_bytes()
    footer = len(original) - FOOTER_SIZE
    meta, pos = BlockHandle.decode(original, footer)
    index_handle, handles_end = BlockHandle.decode(original, pos)
    unread = set(range(meta.offset, meta.offset + meta.size + 5))  # contents + trailer
    unread |= set(range(footer, pos))  # metaindex handle
    unread |= set(range(handles_end, len(original) - 8))  # padding
    unchecked: dict[int, list[int]] = {}
    messages: list[str] = []
    for i in range(len(original)):
        for bit in range(8):
            damaged = bytearray(original)
            damaged[i] ^= 1 << bit
            index.write_bytes(bytes(damaged))
            try:
                loaded = await anyckpt.load(ckpt)
            except anyckpt.CorruptCheckpointError as exc:
                messages.append(str(exc))
                continue
            assert_same(loaded)
            unchecked.setdefault(i, []).append(bit)
    assert len(messages) + sum(map(len, unchecked.values())) == 8 * len(original)
    assert all(m.startswith(f"{index}: ") for m in messages)
    # One more: setting the top bit of the index handle's last varint byte, followed by a 00
    # padding byte, makes a longer (non-canonical) encoding of the same number.
    assert set(unchecked) - unread == {handles_end - 1}
    assert unchecked[handles_end - 1] == [7]
    assert original[handles_end - 1] < 0x80
    assert original[handles_end] == 0
    assert len(unchecked) > 40  # the footer padding alone is 30+ bytes
    # Every byte of the data blocks, the index block and the magic is checked.
    assert min(unchecked) >= meta.offset
    assert not set(unchecked) & set(range(index_handle.offset, footer))
    assert not set(unchecked) & set(range(len(original) - 8, len(original)))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "magic",
    [b"\0" * 8, bytes.fromhex("57fb808b247547dc"), bytes.fromhex("db4775248b80fb57")],
)
async def test_wrong_magic(ckpt: Path, magic: bytes) -> None:
    index = Path(f"{ckpt}.index")
    index.write_bytes(index.read_bytes()[:-8] + magic)
    with pytest.raises(anyckpt.CorruptCheckpointError, match="magic") as exc:
        await anyckpt.load(ckpt)
    assert_names(exc, index)


@pytest.mark.anyio
async def test_index_that_is_not_a_table(tmp_path: Path) -> None:
    for i, content in enumerate([b"", b"hello", b"\0" * 1000, Path(__file__).read_bytes()]):
        Path(f"{tmp_path}/x{i}.index").write_bytes(content)
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            await anyckpt.load(tmp_path / f"x{i}")
        assert_names(exc, tmp_path / f"x{i}.index")


# -- the data -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_bit_flip_in_the_data(ckpt: Path) -> None:
    data_file = ckpt.parent / DATA
    original = data_file.read_bytes()
    owner = {}
    for key, entry in entries_of(ckpt).items():
        for i in range(entry.offset, entry.offset + entry.size):
            owner[i] = key
    assert set(owner) == set(range(len(original)))  # the file is exactly the payloads
    string_lengths = set(range(entries_of(ckpt)["s"].offset, entries_of(ckpt)["s"].offset + 3))
    for i in range(len(original)):
        damaged = bytearray(original)
        damaged[i] ^= 1 << (i % 8)
        data_file.write_bytes(bytes(damaged))
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            await anyckpt.load(ckpt)
        assert_names(exc, data_file)
        assert f"tensor {owner[i]!r}" in str(exc.value)
        # Unverified, only the string tensor's structure (its varint lengths) can fail.
        if i in string_lengths:
            with pytest.raises(anyckpt.CorruptCheckpointError):
                await anyckpt.load(ckpt, verify=False)
            continue
        loaded = await anyckpt.load(ckpt, verify=False)
        assert set(loaded) == set(VALUES)
        # The other tensors are intact; the damaged one is not.
        for key, value in VALUES.items():
            same = (
                loaded[key].tolist() == value.tolist()
                if value.dtype == object
                else loaded[key].tobytes() == np.asarray(value).tobytes()
            )
            is_length_crc = key == "s" and i not in string_lengths and i < min(string_lengths) + 7
            assert same == (key != owner[i] or is_length_crc), (i, key)
        # A read of another tensor does not see the damage, even verified.
        other = "w" if owner[i] != "w" else "b"
        async with anyckpt.open(ckpt) as reader:
            await reader.read(other)
    data_file.write_bytes(original)
    assert_same(await anyckpt.load(ckpt))


@pytest.mark.anyio
async def test_data_file_shorter_than_the_index_says(ckpt: Path) -> None:
    data_file = ckpt.parent / DATA
    entries = entries_of(ckpt)
    last = max(entries, key=lambda k: entries[k].offset + entries[k].size)
    assert last == "w"
    original = data_file.read_bytes()
    for cut in (1, 5, len(original) - entries["w"].offset):
        data_file.write_bytes(original[:-cut])
        with pytest.raises(anyckpt.CorruptCheckpointError, match="past the end") as exc:
            await anyckpt.load(ckpt)
        assert_names(exc, data_file)
        assert "'w'" in str(exc.value)
        async with anyckpt.open(ckpt) as reader:
            for index in [None, (0,), (slice(0, 1),), (slice(None),)]:
                with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
                    await reader.read("w", index=index)
                assert_names(exc, data_file)
            # What lies before the cut still reads.
            assert (await reader.read("b")) == -3
        loaded = await anyckpt.load(ckpt, keys=["s", "b"])
        assert loaded["s"].tolist() == VALUES["s"].tolist()
        # The empty tensor sits at the end of the file, so now past it.
        with pytest.raises(anyckpt.CorruptCheckpointError, match="'z'"):
            await anyckpt.load(ckpt, keys=["z"])


@pytest.mark.anyio
async def test_data_file_shorter_on_memory_filesystem() -> None:
    prefix = "memory://anyckpt-corrupt/short/c"
    fs = fsspec.filesystem("memory")
    try:
        await anyckpt.save(prefix, VALUES, durable=False)
        path = f"{prefix}.{DATA.split('.', 1)[1]}"
        with fs.open(path, "rb") as f:
            content = f.read()
        with fs.open(path, "wb") as f:
            f.write(content[:-1])
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            await anyckpt.load(prefix)
        # fsspec spells the URL memory:///..., with the root's slash.
        assert exc.value.path == f"memory:///{path.removeprefix('memory://')}"
        assert str(exc.value).startswith(f"{exc.value.path}: ")
        with pytest.raises(anyckpt.CorruptCheckpointError):
            async with anyckpt.open(prefix) as reader:
                await reader.read("w", index=(1,))
    finally:
        fs.rm("/anyckpt-corrupt", recursive=True)


# -- missing files --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_missing_data_shard(tmp_path: Path) -> None:
    prefix = tmp_path / "m"
    values = {"a/x": np.ones(3), "b/y": np.arange(4)}
    await anyckpt.save(
        prefix, values, durable=False, options={"shard_of": lambda k: 0 if k < "b" else 1}
    )
    shard1 = tmp_path / "m.data-00001-of-00002"
    shard1.unlink()
    with pytest.raises(anyckpt.CheckpointNotFoundError) as exc:
        await anyckpt.load(prefix)
    assert_names(exc, shard1)
    assert isinstance(exc.value, FileNotFoundError)
    # The other shard still reads.
    loaded = await anyckpt.load(prefix, keys=["a/x"])
    assert loaded["a/x"].tolist() == [1.0, 1.0, 1.0]
    async with anyckpt.open(prefix) as reader:
        with pytest.raises(anyckpt.CheckpointNotFoundError):
            await reader.read("b/y", index=(slice(0, 2),))
    (tmp_path / "m.data-00000-of-00002").unlink()
    with pytest.raises(anyckpt.CheckpointNotFoundError) as exc:
        await anyckpt.load(prefix, keys=["a/x"])
    assert_names(exc, tmp_path / "m.data-00000-of-00002")


@pytest.mark.anyio
async def test_nonexistent_prefix(tmp_path: Path) -> None:
    for prefix in (tmp_path / "nope", tmp_path / "no" / "dir" / "c"):
        with pytest.raises(anyckpt.CheckpointNotFoundError) as exc:
            await anyckpt.load(prefix)
        assert_names(exc, prefix)
        with pytest.raises(anyckpt.CheckpointNotFoundError):
            async with anyckpt.open(prefix):
                pass
    with pytest.raises(anyckpt.CheckpointNotFoundError) as exc:
        await anyckpt.load("memory://anyckpt-corrupt/none/c")
    assert exc.value.path == "memory:///anyckpt-corrupt/none/c"
    assert str(exc.value).startswith(f"{exc.value.path}: ")


@pytest.mark.anyio
async def test_data_without_index_is_not_a_checkpoint(ckpt: Path) -> None:
    Path(f"{ckpt}.index").unlink()
    with pytest.raises(anyckpt.CheckpointNotFoundError) as exc:
        await anyckpt.load(ckpt)
    assert_names(exc, ckpt)


def test_sync_api_raises_the_same(tmp_path: Path) -> None:
    with pytest.raises(anyckpt.CheckpointNotFoundError) as exc:
        anyckpt.sync.load(tmp_path / "nope")
    assert_names(exc, tmp_path / "nope")
    with pytest.raises(anyckpt.CheckpointNotFoundError), anyckpt.sync.open(tmp_path / "nope"):
        pass


# -- crafted entries ------------------------------------------------------------------------

HUGE = 1 << 40


def write_crafted(
    prefix: Path,
    entries: list[tuple[bytes, BundleEntry]],
    *,
    num_shards: int = 1,
    data: bytes = b"\0" * 64,
) -> None:
    table = build_table(
        [(b"", encode_header(num_shards)), *sorted((k, encode_entry(e)) for k, e in entries)]
    )
    Path(f"{prefix}.index").write_bytes(table)
    for shard in range(num_shards):
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(data)


def _slice_key(name: bytes, extents: list[tuple[int, int]]) -> bytes:
    return encode_tensor_name_slice(name, extents)


CRAFTED: dict[str, list[tuple[bytes, BundleEntry]]] = {
    # 4 TiB of float32 that the 64-byte data file cannot hold.
    "huge_float32": [(b"w", BundleEntry(1, (HUGE,), size=4 * HUGE))],
    "huge_2d": [(b"w", BundleEntry(1, (HUGE, 4), size=16 * HUGE))],
    "huge_offset": [(b"w", BundleEntry(1, (2,), offset=1 << 62, size=8))],
    "offset_past_end": [(b"w", BundleEntry(1, (2,), offset=60, size=8))],
    "size_disagrees_with_shape": [(b"w", BundleEntry(1, (2, 3), size=4))],
    "product_beyond_int64": [(b"w", BundleEntry(1, (1 << 62, 1 << 62), size=16))],
    "huge_string_tensor": [(b"w", BundleEntry(7, (HUGE,), size=HUGE + 4))],
    "more_strings_than_bytes": [(b"w", BundleEntry(7, (100,), size=10))],
    "string_lengths_absurd": [(b"w", BundleEntry(7, (1,), size=15))],
    "shard_out_of_range": [(b"w", BundleEntry(1, (2,), shard_id=3, size=8))],
    "huge_partitioned": [
        (b"w", BundleEntry(1, (HUGE,), slices=(((0, HUGE),),))),
        (_slice_key(b"w", [(0, HUGE)]), BundleEntry(1, (HUGE,), size=4 * HUGE)),
    ],
    "partition_missing": [
        (b"w", BundleEntry(1, (4,), slices=(((0, 2),), ((2, 2),)))),
        (_slice_key(b"w", [(0, 2)]), BundleEntry(1, (2,), size=8)),
    ],
    "partitions_do_not_cover": [
        (b"w", BundleEntry(1, (HUGE,), slices=(((0, 2),),))),
        (_slice_key(b"w", [(0, 2)]), BundleEntry(1, (2,), size=8)),
    ],
    "partition_outside_shape": [
        (b"w", BundleEntry(1, (4,), slices=(((2, 4),),))),
        (_slice_key(b"w", [(2, 4)]), BundleEntry(1, (4,), size=16)),
    ],
    "partition_of_other_dtype": [
        (b"w", BundleEntry(1, (2,), slices=(((0, 2),),))),
        (_slice_key(b"w", [(0, 2)]), BundleEntry(2, (2,), size=16)),
    ],
    "partition_slice_past_end": [
        (b"w", BundleEntry(1, (HUGE,), slices=(((0, HUGE),),))),
        (_slice_key(b"w", [(0, HUGE)]), BundleEntry(1, (HUGE,), offset=8, size=4 * HUGE)),
    ],
}


INCONSISTENT_ENTRY = {
    "size_disagrees_with_shape",
    "product_beyond_int64",
    "more_strings_than_bytes",
    "shard_out_of_range",
    "partition_missing",
    "partition_outside_shape",
    "partitions_do_not_cover",
    "partition_of_other_dtype",
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(CRAFTED))
async def test_crafted_entries_fail_fast_without_allocating(tmp_path: Path, name: str) -> None:
    prefix = tmp_path / "x"
    data = b"\x05" + b"\0" * 63 if name == "string_lengths_absurd" else b"\0" * 64
    write_crafted(prefix, CRAFTED[name], data=data)
    reads: list[Any] = [None, (slice(None),), (slice(0, 1),), (0,)]
    with bounded():
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            await anyckpt.load(prefix)
        assert str(exc.value).startswith(str(tmp_path))
        with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
            await anyckpt.load(prefix, ["w"])
        assert str(exc.value).startswith(str(tmp_path))
        # Opening checks the index as a table and its header; entries are checked when first
        # used: inconsistent ones by every use (spec, read, keys), naming the index file.
        reader = await anyckpt.open(prefix)
        try:
            if name in INCONSISTENT_ENTRY:
                for use in (reader.keys, lambda: reader.spec("w")):
                    with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
                        use()
                    assert exc.value.path == f"{prefix}.index"
                for index in reads:
                    with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
                        await reader.read("w", index=index)
                    assert exc.value.path == f"{prefix}.index"
                with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
                    await reader.read_many(["w"])
                assert exc.value.path == f"{prefix}.index"
                return
            # The rest pass the index checks and are caught when their data is read.
            assert reader.keys() == ["w"]
            for index in reads:
                with pytest.raises(anyckpt.CorruptCheckpointError) as exc:
                    await reader.read("w", index=index)
                assert str(exc.value).startswith(str(tmp_path))
        finally:
            await reader.aclose()


@pytest.mark.anyio
async def test_crafted_header_and_dtypes(tmp_path: Path) -> None:
    # An absurd shard count.
    prefix = tmp_path / "h"
    table = build_table([(b"", encode_header(1 << 30))])
    Path(f"{prefix}.index").write_bytes(table)
    with bounded(), pytest.raises(anyckpt.CorruptCheckpointError, match="shards") as exc:
        await anyckpt.load(prefix)
    assert_names(exc, f"{prefix}.index")
    # No header at all.
    Path(f"{prefix}.index").write_bytes(build_table([(b"w", b"")]))
    with pytest.raises(anyckpt.CorruptCheckpointError, match="header") as exc:
        await anyckpt.load(prefix)
    assert_names(exc, f"{prefix}.index")
    # A dtype anyckpt does not know (DT_RESOURCE = 20): unsupported, not corrupt.
    write_crafted(prefix, [(b"w", BundleEntry(20, (1,), size=8))])
    with pytest.raises(anyckpt.UnsupportedFormatError) as exc2:
        await anyckpt.load(prefix)
    assert_names(exc2, f"{prefix}.index")
    # A rank beyond TensorShape's limit.
    write_crafted(prefix, [(b"w", BundleEntry(1, (1,) * 300, size=4))])
    with pytest.raises(anyckpt.CorruptCheckpointError, match="shape") as exc:
        await anyckpt.load(prefix)
    assert_names(exc, f"{prefix}.index")


@pytest.mark.anyio
async def test_crafted_valid_entry_reads(tmp_path: Path) -> None:
    """Control for the crafted cases: the same machinery with consistent numbers works."""
    prefix = tmp_path / "ok"
    payload = np.arange(4, dtype="<f4").tobytes()
    entries = [
        (b"w", BundleEntry(1, (2, 2), offset=8, size=16, crc32c=masked_crc32c(payload))),
        (b"p", BundleEntry(1, (4,), slices=(((0, 1),), ((1, 3),)))),
        (_slice_key(b"p", [(0, 1)]), BundleEntry(1, (1,), offset=8, size=4)),
        (_slice_key(b"p", [(1, 3)]), BundleEntry(1, (3,), offset=12, size=12)),
    ]
    entries = [
        (k, BundleEntry(e.dtype, e.shape, e.shard_id, e.offset, e.size, _crc(e, payload), e.slices))
        for k, e in entries
    ]
    write_crafted(prefix, entries, data=b"\0" * 8 + payload + b"\0" * 40)
    loaded = await anyckpt.load(prefix)
    assert loaded["w"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert loaded["p"].tolist() == [0.0, 1.0, 2.0, 3.0]
    async with anyckpt.open(prefix) as reader:
        assert (await reader.read("p", index=(slice(0, 2),))).tolist() == [0.0, 1.0]


def _crc(entry: BundleEntry, payload: bytes) -> int:
    if entry.slices:
        return 0
    start = entry.offset - 8
    return masked_crc32c(payload[start : start + entry.size])


def test_math_prod_of_crafted_shapes_is_huge() -> None:
    """Sanity: the crafted shapes really describe tensors far beyond memory."""
    assert math.prod(CRAFTED["huge_float32"][0][1].shape) * 4 == 4 << 40
    assert math.prod(CRAFTED["product_beyond_int64"][0][1].shape) > 1 << 63


@pytest.mark.anyio
@pytest.mark.parametrize(
    "slices",
    [(((0, 2),), ((0, 2),)), (((0, 2),), ((1, 2),))],
    ids=["duplicate", "overlap-with-gap"],
)
async def test_overlapping_partitions_are_corrupt(
    tmp_path: Path, slices: tuple[tuple[tuple[int, int], ...], ...]
) -> None:
    payload = np.array([1, 2], dtype="<f4").tobytes()
    entries = [(b"w", BundleEntry(1, (4,), slices=slices))]
    entries += [
        (
            _slice_key(b"w", list(extents)),
            BundleEntry(1, (2,), size=8, crc32c=masked_crc32c(payload)),
        )
        for extents in dict.fromkeys(slices)
    ]
    write_crafted(tmp_path / "o", entries, data=payload)
    with pytest.raises(anyckpt.CorruptCheckpointError):
        await anyckpt.load(tmp_path / "o")

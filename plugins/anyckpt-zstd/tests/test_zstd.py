"""anyckpt-zstd: round trips over dtypes/chunk sizes/options, partial reads that decompress only
their chunks, registration, conversion of a TF checkpoint, and damaged files."""

from __future__ import annotations

import contextlib
import json
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import ml_dtypes
import numpy as np
import pytest
from anyckpt_zstd import ZstdFormat, ZstdReader, codec
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import anyckpt
import anyckpt.sync
from anyckpt.codecs.crc import crc32c
from anyckpt.partitioned import Partitioned
from anyckpt.storage import Storage

#: The TF-written fixtures of the anyckpt repository this plugin lives in (tests/fixture_paths.py).
FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "tf-2.21"
DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    ml_dtypes.bfloat16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
    object,
]


def make(seed: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is object:
        out = np.empty(shape, dtype=object)
        for i in np.ndindex(*shape):
            out[i] = rng.bytes(int(rng.integers(0, 20)))
        return out
    dt = np.dtype(dtype)
    raw = np.frombuffer(rng.bytes(int(np.prod(shape)) * dt.itemsize), np.uint8).copy()
    if dt == np.bool_:
        raw &= 1
    return raw.view(dt).reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if b.dtype == object:
        return a.dtype == object and a.shape == b.shape and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
            st.integers(0, 2**31),
        ),
        max_size=5,
    ),
    chunk=st.sampled_from([1, 7, 64, 1 << 20]),
    shuffle=st.booleans(),
    level=st.sampled_from([-5, 1, 3]),
)
def test_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[Any, tuple[int, ...], int]],
    chunk: int,
    shuffle: bool,
    level: int,
) -> None:
    tensors = {f"t{i}": make(seed, dtype, shape) for i, (dtype, shape, seed) in enumerate(specs)}
    directory = tmp_path_factory.mktemp("z")
    options = {"chunk_bytes": chunk, "shuffle": shuffle, "level": level, "threads": 2}
    anyckpt.sync.save(directory / "m", tensors, format="zstd", options=options)
    loaded = anyckpt.sync.load(directory / "m")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert same(loaded[key], value), key
    with anyckpt.sync.open(directory / "m") as reader:
        for key, value in tensors.items():
            if value.ndim:
                assert same(reader.read(key, (slice(1, 3),)), value[1:3]), key


def test_a_partial_read_decompresses_only_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64)  # 256 KB
    other = np.ones(100_000, np.float64)
    anyckpt.sync.save(
        tmp_path / "m", {"w": w, "other": other}, format="zstd", options={"chunk_bytes": 16384}
    )
    calls: list[int] = []
    original = ZstdReader._decompress

    def counting(self: ZstdReader, reader: Any, chunk: codec.Chunk, *args: Any) -> bytes:
        calls.append(chunk.offset)
        return original(self, reader, chunk, *args)

    monkeypatch.setattr(ZstdReader, "_decompress", counting)
    with anyckpt.sync.open(tmp_path / "m") as reader:
        assert reader.spec("w").extra["chunks"] == 16
        assert same(reader.read("w", (slice(100, 120),)), w[100:120])  # 20 rows = 5120 bytes
        assert len(calls) == 1
        calls.clear()
        assert same(reader.read("w", 999), w[999])
        assert len(calls) == 1
        calls.clear()
        assert same(reader.read("w"), w)
        assert len(calls) == 16  # and never a chunk of "other"


def test_options_level_and_threads(tmp_path: Path) -> None:
    # Zeros are padded to the ratio limit at every level; "r" compresses better at 19.
    data = {"z": np.zeros(1 << 18, np.float32), "r": (np.arange(1 << 16) % 977).astype(np.float32)}
    sizes = {}
    for level in (1, 19):
        anyckpt.sync.save(
            tmp_path / f"l{level}", data, format="zstd", options={"level": level, "threads": 1}
        )
        sizes[level] = (tmp_path / f"l{level}.zckpt").stat().st_size
        assert open_zstd(tmp_path / f"l{level}").level == level
    assert sizes[19] <= sizes[1]
    assert sizes[1] < (1 << 20) + (1 << 18)  # the zeros compressed to almost nothing
    with pytest.raises(ValueError, match="level"):
        anyckpt.sync.save(tmp_path / "bad", data, format="zstd", options={"level": 99})
    with pytest.raises(ValueError, match="threads"):
        anyckpt.sync.save(tmp_path / "bad", data, format="zstd", options={"threads": 0})


def test_registered_detected_and_partitions_kept(tmp_path: Path) -> None:
    assert isinstance(anyckpt.get_format("zstd"), ZstdFormat)
    p = Partitioned.split(np.arange(20.0).reshape(10, 2), 3)
    anyckpt.sync.save(tmp_path / "m", {"p": p}, format="zstd")
    with anyckpt.sync.open(tmp_path / "m") as reader:  # detected, no format given
        assert [s.extents for s in reader.spec("p").partitions] == list(p.partitions)
        assert reader.files() == [str(tmp_path / "m.zckpt")]


def test_converts_tf_checkpoints_both_ways(tmp_path: Path) -> None:
    for case, prefix in [("v2_dtypes", "model.ckpt-7"), ("v1_single", "model.ckpt-5")]:
        tensors = anyckpt.sync.load(FIXTURES / case / prefix)
        anyckpt.sync.save(tmp_path / case, tensors, format="zstd")
        back = anyckpt.sync.load(tmp_path / case)
        fmt = "v1" if case.startswith("v1") else "v2"
        anyckpt.sync.save(tmp_path / f"{case}-tf", back, format=fmt)
        again = anyckpt.sync.load(tmp_path / f"{case}-tf")
        for key, value in tensors.items():
            assert same(again[key], value), (case, key)


# -- damaged files ------------------------------------------------------------------------


def small(tmp_path: Path) -> bytes:
    anyckpt.sync.save(
        tmp_path / "good",
        {"a": np.arange(300, dtype=np.int32), "s": np.array([b"x", b"yz"], dtype=object)},
        format="zstd",
        options={"chunk_bytes": 256},
    )
    return (tmp_path / "good.zckpt").read_bytes()


def open_zstd(prefix: Path) -> ZstdReader:
    async def main() -> ZstdReader:
        storage, path = Storage.from_url(str(prefix))
        return await ZstdFormat().open(storage, path)

    return anyio.run(main)


def load_zstd(path: Path) -> dict[str, np.ndarray]:
    with anyckpt.sync.open(path, format="zstd") as reader:
        return reader.read_many()


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    data = small(tmp_path)
    for size in range(len(data)):
        (tmp_path / "t.zckpt").write_bytes(data[:size])
        with pytest.raises(anyckpt.CorruptCheckpointError):
            load_zstd(tmp_path / "t")


def test_every_byte_flip_is_caught(tmp_path: Path) -> None:
    data = small(tmp_path)
    footer_reserved = range(len(data) - 4, len(data))  # version: checked too
    for pos in range(len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        (tmp_path / "f.zckpt").write_bytes(flipped)
        try:
            loaded = load_zstd(tmp_path / "f")
        except anyckpt.CorruptCheckpointError:
            continue
        except anyckpt.UnsupportedFormatError:
            continue
        # Nothing flipped may pass unnoticed with different data.
        assert pos not in footer_reserved
        assert loaded["a"].tolist() == list(range(300)), pos
        assert loaded["s"].tolist() == [b"x", b"yz"], pos


def crafted(tmp_path: Path, tensors: dict[str, Any], frames: bytes = b"") -> Path:
    header = json.dumps({"format": "anyckpt-zstd", "version": 1, "tensors": tensors}).encode()
    path = tmp_path / "c.zckpt"
    path.write_bytes(frames + header + codec.encode_footer(len(frames), header))
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        # 2**40 floats claimed, nothing stored.
        ({"dtype": 1, "shape": [1 << 40], "layout": "shuffle", "chunks": []}, "needs"),
        # A 1 GiB chunk claimed for 10 compressed bytes.
        (
            {"dtype": 1, "shape": [1 << 28], "layout": "raw", "chunks": [[0, 10, 1 << 30, 0]]},
            "ratio limit",
        ),
        ({"dtype": 1, "shape": [4], "layout": "raw", "chunks": [[0, 10**9, 16, 0]]}, "outside"),
        ({"dtype": 99, "shape": [1], "layout": "raw", "chunks": []}, "malformed"),
        ({"dtype": 7, "shape": [2], "layout": "raw", "chunks": []}, "does not fit"),
        ({"dtype": 3, "shape": [3], "layout": "raw", "chunks": [[0, 6, 6, 0]]}, "splits"),
        ({"dtype": 1, "shape": "x", "layout": "raw", "chunks": []}, "dimension"),
    ],
)
def test_crafted_headers_are_refused_quickly(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    path = crafted(tmp_path, {"t": entry}, b"\0" * 16)
    started = time.monotonic()
    with pytest.raises(anyckpt.CorruptCheckpointError, match=message):
        load_zstd(path)
    assert time.monotonic() - started < 5


def test_frame_that_lies_about_its_size_is_refused(tmp_path: Path) -> None:
    import zstandard

    frame = zstandard.ZstdCompressor().compress(np.arange(4, dtype="<i4").tobytes())
    entry = {"dtype": 3, "shape": [8], "layout": "raw", "chunks": [[0, len(frame), 32, 0]]}
    with pytest.raises(anyckpt.CorruptCheckpointError, match="holds 16 bytes"):
        load_zstd(crafted(tmp_path, {"t": entry}, frame))
    raw = np.arange(4, dtype="<i4").tobytes()
    entry = {"dtype": 3, "shape": [4], "layout": "raw", "chunks": [[0, len(frame), 16, 0]]}
    with pytest.raises(anyckpt.CorruptCheckpointError, match="checksum"):
        load_zstd(crafted(tmp_path, {"t": entry}, frame))
    entry["chunks"] = [[0, len(frame), 16, crc32c(raw)]]
    assert load_zstd(crafted(tmp_path, {"t": entry}, frame))["t"].tolist() == [0, 1, 2, 3]


def test_overlapping_chunks_and_bad_footer(tmp_path: Path) -> None:
    entry = {"dtype": 4, "shape": [2], "layout": "raw", "chunks": [[0, 8, 1, 0], [4, 8, 1, 0]]}
    with pytest.raises(anyckpt.CorruptCheckpointError, match="overlap"):
        load_zstd(crafted(tmp_path, {"t": entry}, b"\0" * 16))
    path = tmp_path / "f.zckpt"
    path.write_bytes(struct.pack("<8sQQII", b"ACKZSTD1", 0, 1 << 40, 0, 1))
    with pytest.raises(anyckpt.CorruptCheckpointError, match="does not end at the footer"):
        load_zstd(tmp_path / "f")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_headers_never_crash(data: bytes) -> None:
    with contextlib.suppress(codec.ContainerError):
        codec.decode_header(data, crc32c(data), 1000)


# -- the ratio limit and bounded decompression (issue 13, defect 5) -------------------------


def zeros_bomb(tmp_path: Path, raw_bytes: int) -> Path:
    """A file whose one chunk is a real zstd frame of ``raw_bytes`` zeros (float32): zstd
    stores them as 4-byte RLE blocks, ~32,700 raw bytes per stored byte."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=3).compress(bytes(raw_bytes))
    chunk = [0, len(frame), raw_bytes, crc32c(bytes(raw_bytes))]
    entry = {"dtype": 1, "shape": [raw_bytes // 4], "layout": "raw", "chunks": [chunk]}
    return crafted(tmp_path, {"t": entry}, frame)


def test_an_8kb_file_claiming_256mib_is_refused(tmp_path: Path) -> None:
    path = zeros_bomb(tmp_path, 256 << 20)
    assert path.stat().st_size < 8500
    tracemalloc.start()
    try:
        with pytest.raises(anyckpt.CorruptCheckpointError, match="ratio limit") as info:
            load_zstd(tmp_path / "c")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 1 << 20


def read_with(fmt: ZstdFormat, prefix: Path) -> dict[str, np.ndarray]:
    async def main() -> dict[str, np.ndarray]:
        storage, path = Storage.from_url(str(prefix))
        reader = await fmt.open(storage, path)
        return await reader.read_many()

    return anyio.run(main)


def test_a_trusted_file_over_the_limit_reads_with_the_opt_in_in_bounded_memory(
    tmp_path: Path,
) -> None:
    raw = 32 << 20
    zeros_bomb(tmp_path, raw)
    tracemalloc.start()
    try:
        out = read_with(ZstdFormat(max_ratio=1 << 15), tmp_path / "c")["t"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == raw
    assert not out.any()
    # The output array and a constant: the chunk is decompressed straight into it.
    assert peak < raw + (1 << 20), peak


def test_shuffled_chunks_are_unshuffled_while_streaming(tmp_path: Path) -> None:
    w = np.arange(3 << 20, dtype=np.float64)  # 24 MiB in one chunk, byte-shuffled
    anyckpt.sync.save(tmp_path / "m", {"w": w}, format="zstd", options={"chunk_bytes": 32 << 20})
    tracemalloc.start()
    try:
        back = anyckpt.sync.load(tmp_path / "m")["w"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert same(back, w)
    assert peak < w.nbytes + (2 << 20), peak  # no decompressed or unshuffled copy of the chunk


def test_the_writer_pads_chunks_to_the_ratio_limit(tmp_path: Path) -> None:
    zeros = np.zeros(1 << 20, np.float32)  # 4 MiB: ~30,000x without padding
    anyckpt.sync.save(tmp_path / "m", {"z": zeros}, format="zstd")
    size = (tmp_path / "m.zckpt").stat().st_size
    assert zeros.nbytes // codec.DEFAULT_MAX_RATIO <= size < zeros.nbytes // 1000 + 512
    assert same(anyckpt.sync.load(tmp_path / "m")["z"], zeros)
    assert same(read_with(ZstdFormat(), tmp_path / "m")["z"], zeros)
    # A writer may go further (max_ratio option); then readers must opt in.
    options = {"max_ratio": 1 << 15}
    anyckpt.sync.save(tmp_path / "big", {"z": zeros}, format="zstd", options=options)
    assert (tmp_path / "big.zckpt").stat().st_size < 1024
    with pytest.raises(anyckpt.CorruptCheckpointError, match="ratio limit"):
        anyckpt.sync.load(tmp_path / "big")
    assert same(read_with(ZstdFormat(max_ratio=1 << 15), tmp_path / "big")["z"], zeros)
    with pytest.raises(ValueError, match="max_ratio"):
        ZstdFormat(max_ratio=0)


@pytest.mark.parametrize("level", [3, 22])
def test_windows_stay_within_the_readers_limit(tmp_path: Path, level: int) -> None:
    import zstandard

    data = make(3, np.uint8, (9 << 20,))  # ultra levels would pick a 2^25+ window
    options = {"level": level, "chunk_bytes": 16 << 20, "threads": 1}
    anyckpt.sync.save(tmp_path / "m", {"d": data}, format="zstd", options=options)
    assert same(anyckpt.sync.load(tmp_path / "m")["d"], data)
    frame = (tmp_path / "m.zckpt").read_bytes()
    assert zstandard.get_frame_parameters(frame).window_size <= 1 << codec.MAX_WINDOW_LOG


def test_a_full_read_of_many_tiny_tensors_goes_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TensorInfo and frame of each tensor live for one batch of at most
    ``_BATCH_TENSORS`` tensors, not for the whole read (issue 18: 10^6 tensors of 16 bytes fit
    one 64 MiB batch: 687 B per tensor beyond the result)."""
    import anyckpt_zstd.format as zstd_format

    tensors = {f"t{i:03d}": np.full(4, i, np.float32) for i in range(50)}
    anyckpt.sync.save(tmp_path / "m", tensors, format="zstd")
    monkeypatch.setattr(zstd_format, "_BATCH_TENSORS", 8)
    batches: list[int] = []
    original = zstd_format._IO.prefetch

    def counting(self: Any, chunks: list[codec.Chunk]) -> None:
        batches.append(len(chunks))
        original(self, chunks)

    monkeypatch.setattr(zstd_format._IO, "prefetch", counting)
    loaded = anyckpt.sync.load(tmp_path / "m")
    assert list(loaded) == list(tensors)
    for key, value in tensors.items():
        assert same(loaded[key], value), key
    assert sum(batches) == 50
    assert max(batches) == 8

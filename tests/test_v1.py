"""The V1 format: TF fixtures read exactly and re-saved byte for byte, round trips, partitioned
tensors, sharded naming and commit order, the sans-I/O codec, and damaged files."""

from __future__ import annotations

import base64
import filecmp
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import anyio
import ml_dtypes
import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import anyckpt
import anyckpt.sync
from anyckpt._proto import saved_tensor_slice_pb2, tensor_pb2
from anyckpt.codecs import DecodeError
from anyckpt.codecs import v1 as codec
from anyckpt.codecs.ordered_code import encode_tensor_name_slice
from anyckpt.codecs.table import TableBuilder
from anyckpt.codecs.varint import encode_varint
from anyckpt.formats import get_format
from anyckpt.formats.v1 import V1Format, pattern_path, shard_path
from anyckpt.partitioned import Partitioned
from anyckpt.storage import Storage

V1_DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "bool": np.bool_,
    "float16": np.float16,
    "complex64": np.complex64,
    "complex128": np.complex128,
}
ENUMS = {
    "float32": 1,
    "float64": 2,
    "int32": 3,
    "uint8": 4,
    "int16": 5,
    "int8": 6,
    "complex64": 8,
    "int64": 9,
    "bool": 10,
    "uint16": 17,
    "complex128": 18,
    "float16": 19,
}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def strings(items: list[bytes], shape: tuple[int, ...] | None = None) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out.reshape(shape if shape is not None else (len(items),))


def assert_same(actual: np.ndarray, expected: np.ndarray, key: str = "") -> None:
    assert actual.dtype == expected.dtype, (key, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
    if expected.dtype == object:
        assert actual.reshape(-1).tolist() == expected.reshape(-1).tolist(), key
    else:
        assert np.ascontiguousarray(actual).tobytes() == expected.tobytes(), key


def random_array(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return np.frombuffer(rng.bytes(nbytes), dtype=dtype).reshape(shape).copy()


# -- the TF fixtures ----------------------------------------------------------------------


def fixture_expected(case: str) -> dict[str, np.ndarray]:
    manifest = json.loads((FIXTURES / case / "manifest.json").read_text())
    (checkpoint,) = manifest["checkpoints"]
    out = {}
    for key, info in checkpoint["tensors"].items():
        if info["dtype"] == "string":
            out[key] = strings([base64.b64decode(v) for v in info["values_b64"]], info["shape"])
        else:
            out[key] = np.load(FIXTURES / case / info["expected"])
    return out


@pytest.mark.parametrize(
    ("case", "prefix"),
    [
        ("v1_single", "model.ckpt-5"),
        ("v1_sharded", "model.ckpt-5-?????-of-00002"),
        ("v1_sharded", "model.ckpt-5"),
    ],
)
def test_fixture_reads_exactly(case: str, prefix: str) -> None:
    expected = fixture_expected(case)
    path = str(FIXTURES / case / prefix)
    loaded = anyckpt.sync.load(path)
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert_same(loaded[key], value, key)
    with anyckpt.sync.open(path) as reader:
        assert reader.keys() == sorted(expected)
        names = [os.path.basename(f) for f in reader.files()]
        if case == "v1_single":
            assert names == ["model.ckpt-5"]
            assert [p.extents for p in reader.spec("v1/part").partitions] == [
                ((0, 2), (0, 2)),
                ((2, 2), (0, 2)),
                ((4, 2), (0, 2)),
            ]
            assert reader.spec("v1/float32").partitions == ()
            assert_same(reader.read("v1/part", (slice(1, 5),)), expected["v1/part"][1:5])
        else:
            assert names == ["model.ckpt-5-00000-of-00002", "model.ckpt-5-00001-of-00002"]
            spec = reader.spec("d1/part")
            assert spec.shape == (5, 3)
            assert spec.dtype == np.int64
            assert [p.extents for p in spec.partitions] == [((0, 5), (0, 2)), ((0, 5), (2, 1))]
            assert_same(reader.read("d1/part", 3), expected["d1/part"][3])


def test_fixtures_are_detected_as_v1() -> None:
    async def main() -> None:
        v1 = get_format("v1")
        for case, prefix in [
            ("v1_single", "model.ckpt-5"),
            ("v1_sharded", "model.ckpt-5-?????-of-00002"),
            ("v1_sharded", "model.ckpt-5"),
        ]:
            storage, path = Storage.from_url(str(FIXTURES / case / prefix))
            assert await v1.detect(storage, path)
            assert (await anyckpt.formats.detect_format(storage, path)).name == "v1"
        storage, path = Storage.from_url(str(FIXTURES / "v2_dtypes" / "model.ckpt-7"))
        assert not await v1.detect(storage, path)  # no file of that name, no shards
        storage, path = Storage.from_url(str(FIXTURES / "v2_dtypes" / "model.ckpt-7.index"))
        assert await v1.detect(storage, path)  # a table file: V1 can at least try to open it
        storage, path = Storage.from_url(str(FIXTURES / "v1_single" / "model.ckpt-5.meta"))
        assert not await v1.detect(storage, path)  # not a table

    anyio.run(main)


def test_fixtures_resave_byte_for_byte(tmp_path: Path) -> None:
    single = anyckpt.sync.load(FIXTURES / "v1_single" / "model.ckpt-5")
    single["v1/part"] = Partitioned.split(single["v1/part"], 3, axis=0)
    written = anyckpt.sync.save(tmp_path / "model.ckpt-5", single, format="v1")
    assert written == [str(tmp_path / "model.ckpt-5")]
    assert filecmp.cmp(written[0], FIXTURES / "v1_single" / "model.ckpt-5", shallow=False)

    sharded = anyckpt.sync.load(FIXTURES / "v1_sharded" / "model.ckpt-5")
    sharded["d1/part"] = Partitioned.split(sharded["d1/part"], 2, axis=1)
    devices = {k: "/cpu:1" if k.startswith("d1/") else "/cpu:0" for k in sharded}
    written = anyckpt.sync.save(
        tmp_path / "model.ckpt-5", sharded, format="v1", options={"devices": devices}
    )
    assert [os.path.basename(p) for p in written] == [
        "model.ckpt-5-00000-of-00002",
        "model.ckpt-5-00001-of-00002",
    ]
    for path in written:
        original = FIXTURES / "v1_sharded" / os.path.basename(path)
        assert filecmp.cmp(path, original, shallow=False), path


# -- round trips --------------------------------------------------------------------------


def all_kinds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    t: dict[str, np.ndarray] = {}
    for name, dtype in V1_DTYPES.items():
        t[f"dtypes/{name}"] = random_array(rng, dtype, (3, 4))
        t[f"scalars/{name}"] = random_array(rng, dtype, ())
        t[f"empty/{name}"] = np.zeros((0, 2), dtype=dtype)
    for bits in (8, 16, 32, 64):
        info = np.iinfo(f"int{bits}")
        t[f"limits/int{bits}"] = np.array([info.min, -1, 0, 1, info.max], dtype=f"int{bits}")
    t["limits/uint16"] = np.array([0, 127, 128, 16383, 16384, 65535], dtype=np.uint16)
    t["strings"] = strings([b"", b"\x00\xff", "ü".encode(), b"x" * 300], (2, 2))
    t["strings/scalar"] = strings([b"one"], ())
    t["strings/empty"] = strings([], (0,))
    t["odd/ключ with space:0"] = np.arange(5, dtype=np.int32)
    t["rank5"] = np.arange(48, dtype=np.float64).reshape(2, 3, 1, 4, 2)
    return t


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["local", "memory"])
async def test_round_trip_every_kind(tmp_path: Path, where: str) -> None:
    tensors = all_kinds()
    prefix = str(tmp_path / "c") if where == "local" else f"memory://v1rt/{time.time_ns()}/c"
    written = await anyckpt.save(prefix, tensors, format="v1", durable=False)
    assert len(written) == 1
    loaded = await anyckpt.load(prefix)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert_same(loaded[key], value, key)
    async with anyckpt.open(prefix) as reader:
        for key, value in tensors.items():
            assert reader.spec(key).shape == value.shape
            assert reader.spec(key).dtype == value.dtype
        assert_same(await reader.read("rank5", (1, slice(0, 2))), tensors["rank5"][1, 0:2])


@pytest.mark.anyio
async def test_partitioned_round_trip_and_sliced_reads(tmp_path: Path) -> None:
    full = np.arange(60, dtype=np.float32).reshape(10, 6)
    pieces = [
        ([(0, 4), (0, 6)], full[0:4]),
        ([slice(4, 10), slice(0, 3)], full[4:, :3]),
        ([(4, 6), (3, 3)], full[4:, 3:]),
    ]
    tensors = {
        "w": Partitioned((10, 6), pieces),
        "s": Partitioned.split(strings([b"a", b"bb", b"", b"dddd", b"e"]), 2),
        "plain": np.ones(3),
    }
    prefix = str(tmp_path / "p")
    for fmt in ("v1", "v2"):
        await anyckpt.save(prefix + fmt, tensors, format=fmt, durable=False)
        async with anyckpt.open(prefix + fmt) as reader:
            assert reader.keys() == ["plain", "s", "w"]
            spec = reader.spec("w")
            assert [p.extents for p in spec.partitions] == [
                ((0, 4), (0, 6)),
                ((4, 6), (0, 3)),
                ((4, 6), (3, 3)),
            ]
            assert_same(await reader.read("w"), full)
            assert_same(await reader.read("w", (slice(3, 6), slice(2, 5))), full[3:6, 2:5])
            assert_same(await reader.read("w", 7), full[7])
            assert_same(await reader.read("s"), strings([b"a", b"bb", b"", b"dddd", b"e"]))
            assert [p.extents for p in reader.spec("s").partitions] == [((0, 3),), ((3, 2),)]


def test_partitioned_input_validation() -> None:
    full = np.zeros((4, 2))
    with pytest.raises(ValueError, match="overlap"):
        Partitioned.from_full(full, [[(0, 3), (0, 2)], [(2, 2), (0, 2)]])
    with pytest.raises(ValueError, match="cover"):
        Partitioned.from_full(full, [[(0, 3), (0, 2)]])
    with pytest.raises(ValueError, match="does not fit"):
        Partitioned.from_full(full, [[(0, 5), (0, 2)]])
    with pytest.raises(ValueError, match="holds an array of shape"):
        Partitioned((4, 2), [([(0, 4), (0, 2)], np.zeros((2, 2)))])
    with pytest.raises(ValueError, match="scalar"):
        Partitioned.split(np.float32(1), 2)
    p = Partitioned.split(np.arange(10), 3)
    assert p.partitions == (((0, 4),), ((4, 3),), ((7, 3),))
    assert p[2:5].partitions == ()  # a view of part of it is not partitioned
    assert (p * 2).partitions == p.partitions
    assert p.copy().partitions == p.partitions


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.uint32, np.uint64])
def test_dtypes_v1_cannot_hold_are_refused(tmp_path: Path, dtype: Any) -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError, match="V1 checkpoints cannot hold"):
        anyckpt.sync.save(tmp_path / "x", {"ok": np.ones(2), "bad": np.ones(2, dtype)}, format="v1")
    assert os.listdir(tmp_path) == []


def test_non_utf8_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError, match="UTF-8"):
        anyckpt.sync.save(tmp_path / "x", {b"\xff\xfe": np.ones(2)}, format="v1")


# -- sharding -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sharded_names_pattern_and_commit_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {f"t{i}": random_array(rng, np.float32, (100 * (i + 1),)) for i in range(6)}
    prefix = str(tmp_path / "ckpt-3")
    written = await anyckpt.save(
        prefix, tensors, format="v1", options={"max_shard_bytes": 1200}, durable=False
    )
    count = len(written)
    assert count > 2
    assert written == [shard_path(prefix, i, count) for i in range(count)]
    v1 = V1Format()
    storage, _ = Storage.from_url(prefix)
    for name in (prefix, pattern_path(prefix, count)):
        assert await v1.detect(storage, name)
        assert await v1.files(storage, name) == written  # commit marker last
        loaded = await anyckpt.load(name)
        for key, value in tensors.items():
            assert_same(loaded[key], value, key)
    assert await v1.files(storage, pattern_path(prefix, count + 1)) == []
    # Without its commit marker (the last shard) the checkpoint is not there...
    os.rename(written[-1], written[-1] + ".hidden")
    assert not await v1.detect(storage, prefix)
    assert not await v1.detect(storage, pattern_path(prefix, count))
    # ... and without any other shard it is incomplete, not silently partial.
    os.rename(written[-1] + ".hidden", written[-1])
    os.remove(written[1])
    with pytest.raises(anyckpt.CorruptCheckpointError, match="incomplete"):
        await anyckpt.load(prefix)


@pytest.mark.anyio
async def test_a_failed_sharded_save_leaves_nothing(tmp_path: Path) -> None:
    big = np.zeros(1 << 16, dtype=np.float32)
    tensors = {"a": big, "b": big, "c": big, "z_bad": np.ones(2, np.uint32)}
    with pytest.raises(anyckpt.UnsupportedFormatError):
        await anyckpt.save(
            tmp_path / "c", tensors, format="v1", options={"num_shards": 4}, durable=False
        )
    assert os.listdir(tmp_path) == []

    class Boom(Exception):
        pass

    def shard_of(key: str) -> int:
        if key == "d":
            raise Boom
        return ord(key) - ord("a")

    with pytest.raises(Boom):
        await anyckpt.save(
            tmp_path / "c", {"a": big, "d": big}, format="v1", options={"shard_of": shard_of}
        )
    assert os.listdir(tmp_path) == []


@pytest.mark.anyio
async def test_cancelled_sharded_save_leaves_no_files(tmp_path: Path) -> None:
    tensors = {f"t{i}": np.arange(1 << 17, dtype=np.int32) for i in range(4)}  # varint work
    for delay in (0, 0.002, 0.01, 0.02, 0.05, 0.1):  # land in different phases
        directory = tmp_path / str(delay)
        with anyio.move_on_after(delay):
            await anyckpt.save(
                directory / "c", tensors, format="v1", options={"num_shards": 4}, durable=False
            )
        leftovers = sorted(os.listdir(directory)) if directory.exists() else []
        # Either the save finished (all four shards) or nothing of it is left, not even
        # temporary files.
        assert leftovers in ([], [f"c-0000{i}-of-00004" for i in range(4)]), (delay, leftovers)


@pytest.mark.anyio
async def test_manager_writes_and_retires_v1(tmp_path: Path) -> None:
    async with anyckpt.CheckpointManager(
        tmp_path, max_to_keep=1, format="v1", durable=False
    ) as manager:
        await (await manager.save({"w": np.arange(4.0)}, step=1))
        await (await manager.save({"w": np.arange(5.0)}, step=2))
        restored = await manager.restore()
    assert_same(restored["w"], np.arange(5.0))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-2"]

    async with anyckpt.CheckpointManager(
        tmp_path / "sh",
        max_to_keep=1,
        format="v1",
        durable=False,
        format_options={"devices": lambda k: k.split("/")[0]},
    ) as manager:
        for step in (1, 2):
            await (await manager.save({"gpu0/w": np.ones(3) * step, "gpu1/b": np.ones(2)}, step))
        restored = await manager.restore()
    assert_same(restored["gpu0/w"], np.ones(3) * 2)
    assert sorted(os.listdir(tmp_path / "sh")) == [
        "checkpoint",
        "ckpt-2-00000-of-00002",
        "ckpt-2-00001-of-00002",
    ]


# -- the codec ----------------------------------------------------------------------------


def reference_tensor_proto(array: np.ndarray, name: str) -> bytes:
    """TensorProto bytes as the protobuf library writes them (the oracle)."""
    proto = tensor_pb2.TensorProto()
    flat = array.reshape(-1)
    if name == "float32":
        proto.float_val.extend(flat.tolist())
    elif name == "float64":
        proto.double_val.extend(flat.tolist())
    elif name in ("int8", "int16", "int32", "uint8", "uint16"):
        proto.int_val.extend(int(x) for x in flat)
    elif name == "int64":
        proto.int64_val.extend(int(x) for x in flat)
    elif name == "bool":
        proto.bool_val.extend(bool(x) for x in flat)
    elif name == "float16":
        proto.half_val.extend(int(x) for x in flat.view(np.uint16))
    elif name == "complex64":
        proto.scomplex_val.extend(flat.view(np.float32).tolist())
    elif name == "complex128":
        proto.dcomplex_val.extend(flat.view(np.float64).tolist())
    return bytes(proto.SerializeToString())


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(V1_DTYPES)),
    shape=array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_tensor_proto_matches_protobuf_and_round_trips(
    name: str, shape: tuple[int, ...], seed: int
) -> None:
    array = random_array(np.random.default_rng(seed), V1_DTYPES[name], shape)
    if name in ("float32", "complex64"):
        # protobuf's Python floats lose NaN payloads; keep the oracle comparable.
        array = np.where(np.isnan(array), 0, array).astype(array.dtype)
    encoded = b"".join(bytes(p) for p in codec.encode_tensor_proto(array, ENUMS[name]))
    assert encoded == reference_tensor_proto(array, name)
    decoded = codec.decode_tensor_proto(memoryview(encoded), ENUMS[name], array.size)
    assert_same(decoded.astype(array.dtype).reshape(shape), array)


@settings(max_examples=100, deadline=None)
@given(values=arrays(np.uint64, st.integers(0, 300)))
def test_varints_round_trip(values: np.ndarray) -> None:
    encoded = codec.encode_varints(values)
    reference = b"".join(encode_varint(int(v)) for v in values)
    assert encoded.tobytes() == reference
    assert_same(codec.decode_varints(encoded.tobytes(), len(values)), values)


def test_tensor_proto_unpacked_and_tensor_content_are_read() -> None:
    # An unpacked repeated field and tensor_content are valid encodings TF may also produce.
    unpacked = b"".join(b"\x2d" + np.float32(v).tobytes() for v in (1.5, -2.0))
    got = codec.decode_tensor_proto(memoryview(unpacked), 1, 2)
    assert got.tolist() == [1.5, -2.0]
    ints = b"\x38\x05\x38" + encode_varint((1 << 64) - 3)  # int_val 5, -3 (unpacked)
    assert codec.decode_tensor_proto(memoryview(ints), 6, 2).tolist() == [5, -3]
    content = tensor_pb2.TensorProto(tensor_content=np.array([7, 8], "<i8").tobytes())
    got = codec.decode_tensor_proto(memoryview(content.SerializeToString()), 9, 2)
    assert got.tolist() == [7, 8]


@settings(max_examples=60, deadline=None)
@given(
    entries=st.dictionaries(
        st.binary(min_size=1, max_size=20), st.binary(max_size=300), max_size=60
    ),
    block_size=st.sampled_from([64, 256, 4096]),
    split=st.integers(0, 300),
)
def test_table_writer_matches_table_builder(
    entries: dict[bytes, bytes], block_size: int, split: int
) -> None:
    builder = TableBuilder(block_size)
    writer = codec.TableWriter(block_size)
    out: list[Any] = []
    for key in sorted(entries):
        value = entries[key]
        builder.add(key, value)
        out += writer.add(key, [value[:split], memoryview(value)[split:]])
    out += writer.finish()
    streamed = b"".join(bytes(p) for p in out)
    assert streamed == builder.finish()
    assert writer.offset == len(streamed)


@settings(max_examples=100, deadline=None)
@given(
    name=st.text(min_size=1, max_size=10),
    shape=array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
)
def test_meta_and_slice_entries_match_protobuf(name: str, shape: tuple[int, ...]) -> None:
    raw = name.encode()
    extents = (
        codec.whole(len(shape))
        if len(shape) < 2
        else ((0, 1), (0, -1)) + ((0, -1),) * (len(shape) - 2)
    )
    meta = codec.MetaTensor(raw, 1, shape, (extents,))
    encoded = codec.encode_meta([meta])
    assert codec.decode_meta(encoded) == [meta]
    array = np.arange(math.prod(codec.slice_shape(extents, shape)), dtype=np.float32)
    _, parts = codec.encode_slice_entry(raw, extents, array, 1)
    value = b"".join(bytes(p) for p in parts)
    proto = saved_tensor_slice_pb2.SavedTensorSlices()
    proto.data.name = name
    proto.data.slice.ParseFromString(codec.encode_slice_proto(extents))
    proto.data.data.float_val.extend(array.tolist())
    assert value == proto.SerializeToString()
    data = codec.decode_slice_entry(memoryview(value))
    assert (data.name, data.extents) == (raw, extents)


# -- damaged files ------------------------------------------------------------------------


def small_v1(tmp_path: Path) -> Path:
    prefix = tmp_path / "good"
    anyckpt.sync.save(
        prefix,
        {
            "a": np.arange(6, dtype=np.int32),
            "b": strings([b"x", b"yy"]),
            "p": Partitioned.split(np.arange(8.0), 2),
        },
        format="v1",
    )
    return prefix


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    data = small_v1(tmp_path).read_bytes()
    bad = tmp_path / "bad"
    for size in range(len(data)):
        bad.write_bytes(data[:size])
        with pytest.raises((anyckpt.CorruptCheckpointError, anyckpt.CheckpointNotFoundError)):
            _load_v1(bad)


def _load_v1(path: Path) -> dict[str, np.ndarray]:
    async def main() -> dict[str, np.ndarray]:
        storage, p = Storage.from_url(str(path))
        reader = await V1Format().open(storage, p)
        return await reader.read_many()

    return anyio.run(main)


def test_every_bit_flip_is_caught(tmp_path: Path) -> None:
    data = bytearray(small_v1(tmp_path).read_bytes())
    bad = tmp_path / "bad"
    for pos in range(len(data)):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            bad.write_bytes(flipped)
            try:
                loaded = _load_v1(bad)
            except (anyckpt.CorruptCheckpointError, anyckpt.UnsupportedFormatError):
                continue
            # The few bytes no checksum covers (footer padding, unused handle bits) may
            # change without harm, but then the data must still be exactly right.
            assert loaded["a"].tolist() == list(range(6)), (pos, bit)
            assert loaded["b"].tolist() == [b"x", b"yy"], (pos, bit)
            assert loaded["p"].tolist() == list(np.arange(8.0)), (pos, bit)


def crafted(tmp_path: Path, meta: codec.MetaTensor, value: bytes) -> Path:
    """A V1 file with the given meta and one data entry for its first slice."""
    table = TableBuilder()
    table.add(b"", codec.encode_meta([meta]))
    table.add(encode_tensor_name_slice(meta.name, meta.slices[0]), value)
    path = tmp_path / "crafted"
    path.write_bytes(table.finish())
    return path


@pytest.mark.parametrize(
    ("meta", "value", "message"),
    [
        # A shape of 2**40 elements in a file of a few hundred bytes.
        (codec.MetaTensor(b"x", 1, (1 << 20, 1 << 20), (codec.whole(2),)), b"", "cannot fit"),
        # The data says it holds 3 floats where the shape needs 2.
        (
            codec.MetaTensor(b"x", 1, (2,), (codec.whole(1),)),
            b"".join(
                bytes(p)
                for p in codec.encode_slice_entry(b"x", codec.whole(1), np.ones(3, np.float32), 1)[
                    1
                ]
            ),
            "packed field has 12 bytes",
        ),
        # A packed field whose length runs far past the entry.
        (
            codec.MetaTensor(b"x", 9, (2,), (codec.whole(1),)),
            b"\x12\x0c\x0a\x01x\x12\x02\x0a\x00\x1a\x03\x52\xff\x7f",
            "past the end",
        ),
        # The entry under x's key claims to be y.
        (
            codec.MetaTensor(b"x", 1, (1,), (codec.whole(1),)),
            b"".join(
                bytes(p)
                for p in codec.encode_slice_entry(b"y", codec.whole(1), np.ones(1, np.float32), 1)[
                    1
                ]
            ),
            "holds b'y'",
        ),
        # Overlapping slices.
        (codec.MetaTensor(b"x", 1, (4,), (((0, 3),), ((2, 2),))), b"", "overlap"),
        # A slice outside the shape.
        (codec.MetaTensor(b"x", 1, (4,), (((2, 3),),)), b"", "outside"),
    ],
)
def test_crafted_files_are_refused_quickly(
    tmp_path: Path, meta: codec.MetaTensor, value: bytes, message: str
) -> None:
    if message == "outside":
        with pytest.raises(DecodeError, match=message):
            codec.decode_meta(codec.encode_meta([meta]))
        return
    path = crafted(tmp_path, meta, value)
    with pytest.raises(anyckpt.CorruptCheckpointError, match=message):
        _load_v1(path)


def test_absurd_block_handle_is_refused_before_reading(tmp_path: Path) -> None:
    data = bytearray(small_v1(tmp_path).read_bytes())
    # Point the footer's index handle at a huge size: refused without a huge allocation.
    footer = bytearray(48)
    footer[0:2] = b"\x00\x08"  # metaindex handle (0, 8)
    footer[2:12] = encode_varint(0) + encode_varint(1 << 50)
    footer[40:] = data[-8:]
    (tmp_path / "bad").write_bytes(bytes(data[:-48]) + bytes(footer))
    with pytest.raises(anyckpt.CorruptCheckpointError, match="outside the file"):
        _load_v1(tmp_path / "bad")

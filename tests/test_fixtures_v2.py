"""Real TensorFlow 2.21 V2 checkpoints (``tests/fixtures/tf-2.21``, written by
``tools/tf/make_fixtures.py``) read back bit-exactly, and anyckpt re-saves them byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES

import anyckpt
from anyckpt.codecs.bundle import decode_entry, encode_entry
from anyckpt.codecs.table import build_table, read_table

V2_CASES = [
    "v2_dtypes",
    "v2_large_entry",
    "v2_sharded",
    "v2_partitioned",
    "v2_max_to_keep",
    "tf2_object",
]
#: Written by the tf.compat.v1 Saver: data in sorted key order, so anyckpt can reproduce them.
SAVER_CASES = ["v2_dtypes", "v2_large_entry", "v2_sharded", "v2_max_to_keep"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- helpers --------------------------------------------------------------------------------


def manifest(case: str) -> dict[str, Any]:
    return json.loads((FIXTURES / case / "manifest.json").read_text())


def checkpoints() -> Iterator[tuple[str, dict[str, Any]]]:
    for case in V2_CASES:
        for ckpt in manifest(case)["checkpoints"]:
            yield case, ckpt


CHECKPOINTS = list(checkpoints())
CHECKPOINT_IDS = [f"{case}/{ckpt['prefix']}" for case, ckpt in CHECKPOINTS]


def expected_value(case: str, meta: dict[str, Any]) -> np.ndarray:
    """The expected tensor, from the fixture's own files (not through anyckpt)."""
    path = FIXTURES / case / meta["expected"]
    encoding = meta["npy_encoding"]
    if encoding == "native":
        return np.load(path)
    if encoding == "bfloat16_bits_as_uint16":
        bits = np.load(path)
        assert bits.dtype == np.uint16
        return bits.view(ml_dtypes.bfloat16)
    assert encoding.startswith("object_bytes"), encoding
    # values_b64 is the authoritative copy; the .npy must agree with it.
    values = [base64.b64decode(v) for v in meta["values_b64"]]
    array = np.empty(len(values), dtype=object)
    array[:] = values
    array = array.reshape(meta["shape"])
    from_npy = np.load(path, allow_pickle=True)
    assert from_npy.shape == array.shape
    assert list(from_npy.reshape(-1)) == values
    return array


def raw_bytes(array: np.ndarray) -> bytes:
    """Little-endian C-order bytes of a numeric array (so NaN payloads and -0.0 count)."""
    dtype = array.dtype
    if dtype.itemsize > 1 and dtype.byteorder in "=>":
        array = array.astype(dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def assert_bit_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape, what
    if expected.dtype == object:
        assert actual.dtype == object, what
        got = list(actual.reshape(-1))
        assert all(type(v) is bytes for v in got), what
        assert got == list(expected.reshape(-1)), what
    else:
        assert actual.dtype == expected.dtype, what
        assert raw_bytes(actual) == raw_bytes(expected), what


def expected_tensors(case: str, ckpt: dict[str, Any]) -> dict[str, np.ndarray]:
    return {key: expected_value(case, meta) for key, meta in ckpt["tensors"].items()}


# -- reading --------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "ckpt"), CHECKPOINTS, ids=CHECKPOINT_IDS)
async def test_fixture_reads_back_bit_exactly(case: str, ckpt: dict[str, Any]) -> None:
    prefix = FIXTURES / case / ckpt["prefix"]
    tensors = ckpt["tensors"]
    async with anyckpt.open(prefix) as reader:
        assert reader.keys() == sorted(tensors, key=lambda k: k.encode())
        for key, meta in tensors.items():
            spec = reader.spec(key)
            assert spec.dtype_name == meta["dtype"], key
            assert spec.shape == tuple(meta["shape"]), key
            value = await reader.read(key)
            assert_bit_equal(value, expected_value(case, meta), key)
            if "sha256" in meta:
                assert hashlib.sha256(raw_bytes(value)).hexdigest() == meta["sha256"], key
    # load() gives the same, through the concurrent read_many path.
    loaded = await anyckpt.load(prefix)
    assert set(loaded) == set(tensors)
    for key, meta in tensors.items():
        assert_bit_equal(loaded[key], expected_value(case, meta), key)


def test_fixture_reads_back_through_sync_api() -> None:
    case, ckpt = next((c, k) for c, k in CHECKPOINTS if c == "v2_dtypes")
    loaded = anyckpt.sync.load(FIXTURES / case / ckpt["prefix"])
    for key, meta in ckpt["tensors"].items():
        assert_bit_equal(loaded[key], expected_value(case, meta), key)


@pytest.mark.anyio
async def test_special_float_values_survive() -> None:
    """The NaN payload, -0.0, infinities and the subnormal of v2_dtypes are kept exactly."""
    prefix = FIXTURES / "v2_dtypes" / "model.ckpt-7"
    async with anyckpt.open(prefix) as reader:
        f32 = await reader.read("dtypes/float32")
    bits = set(f32.reshape(-1).view(np.uint32).tolist())
    assert 0x7FC00001 in bits  # the NaN payload
    assert 0x80000000 in bits  # -0.0
    assert {0x7F800000, 0xFF800000} <= bits  # +-inf


@pytest.mark.anyio
async def test_keys_subset_load() -> None:
    case, ckpt = next((c, k) for c, k in CHECKPOINTS if c == "v2_dtypes")
    wanted = ["names/ünïcødé/ключ/名前", "names/trailing_slash/", "zero_size/string"]
    loaded = await anyckpt.load(FIXTURES / case / ckpt["prefix"], keys=wanted)
    assert list(loaded) == wanted
    for key in wanted:
        assert_bit_equal(loaded[key], expected_value(case, ckpt["tensors"][key]), key)


# -- partitioned variables ------------------------------------------------------------------

PARTITIONED = FIXTURES / "v2_partitioned" / "model.ckpt-1"


def partitioned_tensors() -> dict[str, dict[str, Any]]:
    ckpt = manifest("v2_partitioned")["checkpoints"][0]
    return {k: m for k, m in ckpt["tensors"].items() if "partitions" in m}


@pytest.mark.anyio
async def test_partitioned_specs_list_the_partitions() -> None:
    parts = partitioned_tensors()
    assert set(parts) == {"part/w", "part/cols", "part/ids", "part/str"}
    async with anyckpt.open(PARTITIONED) as reader:
        assert reader.spec("plain/b").partitions == ()
        for key, meta in parts.items():
            spec = reader.spec(key)
            got = sorted(
                ([a for a, _ in p.box(spec.shape)], list(p.shape(spec.shape)))
                for p in spec.partitions
            )
            want = sorted((p["offset"], p["shape"]) for p in meta["partitions"])
            assert got == want, key
            # TF's slice spec strings, without the leading full shape.
            specs = sorted(p.spec_string(spec.shape) for p in spec.partitions)
            assert specs == sorted(p["spec"].split(" ")[-1] for p in meta["partitions"]), key


def _boxes(shape: tuple[int, ...]) -> Iterator[tuple[slice | int, ...]]:
    """Every step-1 slice of axis 0, ints of axis 0 (incl. negative), and on rank 2, every
    (slice, slice) box with a few axis-0 ranges."""
    n = shape[0]
    for a, b in itertools.combinations_with_replacement(range(n + 1), 2):
        yield (slice(a, b),)
    for i in range(-n, n):
        yield (i,)
    if len(shape) == 2:
        m = shape[1]
        for (a, b), (c, d) in itertools.product(
            [(0, n), (1, n - 1), (n - 1, n)],
            itertools.combinations(range(m + 1), 2),
        ):
            yield (slice(a, b), slice(c, d))
        for i, (c, d) in itertools.product([0, n - 1], [(0, m), (1, m - 1)]):
            yield (i, slice(c, d))


@pytest.mark.anyio
async def test_partitioned_boxes_equal_numpy_slicing() -> None:
    parts = partitioned_tensors()
    crossed = 0
    async with anyckpt.open(PARTITIONED) as reader:
        for key, meta in parts.items():
            expected = expected_value("v2_partitioned", meta)
            full = await reader.read(key)
            assert_bit_equal(full, expected, key)
            bounds = [(p["offset"], p["shape"]) for p in meta["partitions"]]
            for index in _boxes(expected.shape):
                got = await reader.read(key, index=index)
                # `...` keeps a 0-d array (not a bare element) for an all-int index.
                assert_bit_equal(got, expected[(*index, ...)], f"{key}[{index}]")
                # Count the boxes that touch more than one partition.
                sel = np.zeros(expected.shape, dtype=bool)
                sel[index] = True
                touched = sum(
                    bool(sel[tuple(slice(o, o + s) for o, s in zip(off, shp, strict=True))].any())
                    for off, shp in bounds
                )
                crossed += touched > 1
    assert crossed > 50  # the boxes above do cross partition boundaries


# -- index structure --------------------------------------------------------------------------


def v2_index_files() -> list[Path]:
    return sorted(FIXTURES / case / f"{ckpt['prefix']}.index" for case, ckpt in CHECKPOINTS)


@pytest.mark.parametrize("path", v2_index_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_index_reencodes_byte_identically(path: Path) -> None:
    """Decoding every entry of TF's index and encoding it again rebuilds the same bytes."""
    data = path.read_bytes()
    entries = read_table(data)
    assert entries[0][0] == b""
    rebuilt = [entries[0]] + [(k, encode_entry(decode_entry(v))) for k, v in entries[1:]]
    assert rebuilt == entries
    assert build_table(rebuilt) == data


# -- byte identity when re-saving -----------------------------------------------------------


def _saver_checkpoints() -> list[tuple[str, dict[str, Any]]]:
    return [(c, k) for c, k in CHECKPOINTS if c in SAVER_CASES]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "ckpt"),
    _saver_checkpoints(),
    ids=[f"{c}/{k['prefix']}" for c, k in _saver_checkpoints()],
)
async def test_resave_is_byte_identical(case: str, ckpt: dict[str, Any], tmp_path: Path) -> None:
    """Re-saving TF's tensors (from expected/, not through anyckpt's reader) gives TF's bytes."""
    tensors = expected_tensors(case, ckpt)
    options = None
    if case == "v2_sharded":
        options = {"shard_of": lambda k: 0 if k.startswith("dev0") else 1}
    prefix = tmp_path / ckpt["prefix"]
    written = await anyckpt.save(prefix, tensors, durable=False, options=options)
    tf_files = sorted(f for f in ckpt["files"] if not f.endswith(".meta"))
    assert sorted(Path(p).name for p in written) == tf_files
    for name in tf_files:
        ours = (tmp_path / name).read_bytes()
        theirs = (FIXTURES / case / name).read_bytes()
        assert ours == theirs, name


@pytest.mark.anyio
async def test_resave_tf2_object_differs_only_in_payload_order(tmp_path: Path) -> None:
    """CheckpointManager writes payloads in object-graph order, anyckpt in key order: the index
    entries agree on everything but the offsets, and the data files hold the same payloads."""
    ckpt = next(k for c, k in CHECKPOINTS if c == "tf2_object" and k["prefix"] == "ckpt-4")
    tensors = expected_tensors("tf2_object", ckpt)
    await anyckpt.save(tmp_path / "ckpt-4", tensors, durable=False)
    tf_dir = FIXTURES / "tf2_object"
    ours = read_table((tmp_path / "ckpt-4.index").read_bytes())
    theirs = read_table((tf_dir / "ckpt-4.index").read_bytes())
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    assert ours[0] == theirs[0]  # header
    our_data = (tmp_path / "ckpt-4.data-00000-of-00001").read_bytes()
    tf_data = (tf_dir / "ckpt-4.data-00000-of-00001").read_bytes()
    assert len(our_data) == len(tf_data)
    moved = 0
    for (key, ov), (_, tv) in zip(ours[1:], theirs[1:], strict=True):
        o, t = decode_entry(ov), decode_entry(tv)
        assert (o.dtype, o.shape, o.size, o.crc32c, o.shard_id) == (
            t.dtype,
            t.shape,
            t.size,
            t.crc32c,
            t.shard_id,
        ), key
        assert our_data[o.offset : o.offset + o.size] == tf_data[t.offset : t.offset + t.size]
        moved += o.offset != t.offset
    assert moved > 0  # the order really differs, so byte identity is not expected here


@pytest.mark.anyio
@pytest.mark.parametrize(
    "ckpt",
    [k for c, k in CHECKPOINTS if c == "tf2_object"],
    ids=[k["prefix"] for c, k in CHECKPOINTS if c == "tf2_object"],
)
async def test_tf2_fixture_reads_as_a_tree(ckpt: dict[str, Any]) -> None:
    """Every variable TensorFlow saved is found along the object graph, bit-exactly: the key
    ``a/b/.ATTRIBUTES/VARIABLE_VALUE`` at the object path ``a/b``."""
    from anyckpt.tf2 import read_tree, tree_get

    tree = await read_tree(FIXTURES / "tf2_object" / ckpt["prefix"])
    expected = expected_tensors("tf2_object", ckpt)
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    variables = {k: v for k, v in expected.items() if k.endswith(suffix)}
    assert len(variables) == len(expected) - 1  # all but _CHECKPOINTABLE_OBJECT_GRAPH
    for key, value in variables.items():
        got = np.asarray(tree_get(tree, key[: -len(suffix)]))
        assert got.dtype == value.dtype, key
        if got.dtype == object:  # strings
            assert got.tolist() == value.tolist(), key
        else:
            assert got.tobytes() == value.tobytes(), key
    assert set(tree) == {"model", "save_counter"}
    assert set(tree["model"]) >= {"w", "b", "step", "inner", "blocks"}

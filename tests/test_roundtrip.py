"""save -> load round trips: every dtype, shape and key, bit-exactly, on memory:// and disk."""

from __future__ import annotations

import itertools
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import fsspec
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import anyckpt
from anyckpt.codecs.bundle import decode_entry
from anyckpt.codecs.table import read_table
from anyckpt.storage.fsspec_backend import FsspecReader
from anyckpt.storage.local import LocalReader
from anyckpt.tensors import key_from_bytes

NUMERIC = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}
DTYPE_NAMES = [*NUMERIC, "string"]
#: Bit patterns worth planting: NaN with a payload, -0.0, infinities, a subnormal, all ones.
SPECIAL_BITS = {
    2: [0x7E01, 0x8000, 0x7C00, 0xFC00, 0x0001, 0xFFFF],
    4: [0x7FC00001, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0xFFFFFFFF],
    8: [0x7FF8000000000001, 1 << 63, 0x7FF0000000000000, 0x1, (1 << 64) - 1],
}
SPECIAL_STRINGS = [b"", b"\x00", b"\xff\xfe\x80", b"a\x00b\x00", "ünï".encode(), b"x" * 200]

KEY = st.one_of(
    st.text(min_size=1, max_size=12),
    st.text(alphabet="ab/ ._-:>", min_size=1, max_size=8),
    st.binary(min_size=1, max_size=8),
)
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def name_of(key: str | bytes) -> str:
    return key_from_bytes(key) if isinstance(key, bytes) else key


def make_array(dtype_name: str, shape: tuple[int, ...], seed: int, plant: list[int]) -> np.ndarray:
    """Random contents (every bit pattern possible), with special values planted."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape, dtype=np.int64))
    if dtype_name == "string":
        values = [rng.bytes(int(rng.integers(0, 12))) for _ in range(size)]
        for i, p in enumerate(plant[:size]):
            values[(p * 7 + i) % size] = SPECIAL_STRINGS[p % len(SPECIAL_STRINGS)]
        array = np.empty(size, dtype=object)
        array[:] = values
        return array.reshape(shape)
    dtype = NUMERIC[dtype_name]
    if dtype_name == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = np.frombuffer(rng.bytes(size * dtype.itemsize), dtype=dtype).copy()
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    if unit in SPECIAL_BITS and size:
        words = raw.view(f"<u{unit}")
        for i, p in enumerate(plant):
            words[(p * 7 + i) % words.size] = SPECIAL_BITS[unit][p % len(SPECIAL_BITS[unit])]
    return raw.reshape(shape)


def assert_bit_equal(actual: np.ndarray, expected: np.ndarray, what: object = None) -> None:
    assert isinstance(actual, np.ndarray), what
    assert actual.shape == expected.shape, what
    if expected.dtype == object:
        assert actual.dtype == object, what
        got = actual.reshape(-1).tolist()
        assert all(type(v) is bytes for v in got), what
        assert got == expected.reshape(-1).tolist(), what
        return
    native = expected.dtype.newbyteorder("=") if expected.dtype.byteorder == ">" else expected.dtype
    assert actual.dtype == native, what
    assert actual.dtype.byteorder in "=|<", what
    assert le_bytes(actual) == le_bytes(expected), what


def le_bytes(array: np.ndarray) -> bytes:
    if array.dtype.itemsize > 1 and array.dtype.byteorder != "|":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


class Places:
    """Fresh checkpoint prefixes on memory:// or in a temporary directory, removed after."""

    def __init__(self, kind: str, base: Path) -> None:
        self.kind = kind
        self.base = base

    def new(self) -> str:
        name = uuid.uuid4().hex
        if self.kind == "memory":
            return f"memory://anyckpt-tests/{name}/ckpt"
        return str(self.base / name / "ckpt")

    def cleanup(self, prefix: str) -> None:
        parent = prefix.rsplit("/", 1)[0]
        if self.kind == "memory":
            fs = fsspec.filesystem("memory")
            if fs.exists(parent):
                fs.rm(parent, recursive=True)
        else:
            shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(params=["memory", "local"])
def places(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Places:
    return Places(str(request.param), tmp_path_factory.mktemp("roundtrip"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(fn: Callable[[], Any], backend: str) -> Any:
    return anyio.run(fn, backend=backend)


# -- the main property ----------------------------------------------------------------------


@st.composite
def tensor_sets(draw: st.DrawFn) -> tuple[dict[str | bytes, np.ndarray], dict[str, np.ndarray]]:
    keys = draw(st.lists(KEY, min_size=1, max_size=5, unique_by=name_of))
    given_: dict[str | bytes, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    for key in keys:
        dtype_name = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(array_shapes(min_dims=0, max_dims=6, min_side=0, max_side=3))
        seed = draw(st.integers(0, 2**32 - 1))
        plant = draw(st.lists(st.integers(0, 1000), max_size=4))
        array = make_array(dtype_name, shape, seed, plant)
        given_[key] = array
        expected[name_of(key)] = array
    return given_, expected


@SETTINGS
@given(case=tensor_sets(), backend=st.sampled_from(["asyncio", "trio"]))
def test_any_tensors_round_trip(
    places: Places,
    case: tuple[dict[str | bytes, np.ndarray], dict[str, np.ndarray]],
    backend: str,
) -> None:
    given_, expected = case
    prefix = places.new()

    async def main() -> None:
        written = await anyckpt.save(prefix, given_, durable=False)
        assert [w.rsplit(".", 1)[-1] for w in written] == ["data-00000-of-00001", "index"]
        loaded = await anyckpt.load(prefix)
        assert set(loaded) == set(expected)
        for key, array in expected.items():
            assert_bit_equal(loaded[key], array, key)
        async with anyckpt.open(prefix) as reader:
            assert sorted(reader.keys()) == sorted(expected)
            for key, array in expected.items():
                spec = reader.spec(key)
                assert spec.shape == array.shape
                assert spec.dtype == array.dtype
                assert spec.partitions == ()

    try:
        run(main, backend)
    finally:
        places.cleanup(prefix)


def test_bytes_keys_come_back_as_surrogateescaped_str(tmp_path: Path) -> None:
    tensors = {b"caf\xe9/\xff": np.int8(1), "ok/ü": np.int8(2), b"\x00lead": np.int8(3)}
    anyckpt.sync.save(tmp_path / "c", tensors, durable=False)
    loaded = anyckpt.sync.load(tmp_path / "c")
    assert set(loaded) == {"caf\udce9/\udcff", "ok/ü", "\x00lead"}
    assert loaded["caf\udce9/\udcff"] == 1
    # The stored key is the raw bytes.
    keys = [k for k, _ in read_table((tmp_path / "c.index").read_bytes())]
    assert keys == [b"", b"\x00lead", b"caf\xe9/\xff", "ok/ü".encode()]


# -- input forms ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_big_endian_inputs_are_stored_little_endian(tmp_path: Path) -> None:
    values = {
        "f4": np.array([1.5, -0.0, np.inf, 3e-40], dtype=">f4"),
        "f8": np.arange(6, dtype=">f8").reshape(2, 3),
        "i2": np.array([-2, 300], dtype=">i2"),
        "u8": np.array([2**63 + 5], dtype=">u8"),
        "c8": np.array([1 + 2j], dtype=">c8"),
        "f2": np.array([0.5, -2], dtype=">f2"),
    }
    await anyckpt.save(tmp_path / "be", values, durable=False)
    data = (tmp_path / "be.data-00000-of-00001").read_bytes()
    entries = dict(read_table((tmp_path / "be.index").read_bytes())[1:])
    loaded = await anyckpt.load(tmp_path / "be")
    for key, array in values.items():
        entry = decode_entry(entries[key.encode()])
        stored = data[entry.offset : entry.offset + entry.size]
        assert stored == array.astype(array.dtype.newbyteorder("<")).tobytes(), key
        assert stored != array.tobytes() or array.dtype.itemsize == 1, key
        assert_bit_equal(loaded[key], array, key)
        np.testing.assert_array_equal(loaded[key], array)


@pytest.mark.anyio
async def test_non_contiguous_inputs(tmp_path: Path) -> None:
    base = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    strings = np.array([[b"a", b"bb"], [b"", b"\xff"]], dtype=object)
    values = {
        "transposed": base.T,
        "swapped": base.swapaxes(0, 1),
        "strided": base[::2, 1::3, ::-1],
        "reversed": base[::-1],
        "fortran": np.asfortranarray(base),
        "be_strided": base.astype(">i4")[:, ::2],
        "bool_view": (base > 50)[:, ::2].T,
        "str_t": strings.T,
        "bf16_t": base.astype(ml_dtypes.bfloat16).transpose(2, 0, 1),
    }
    assert not any(v.flags.c_contiguous for v in values.values())
    await anyckpt.save(tmp_path / "nc", values, durable=False)
    loaded = await anyckpt.load(tmp_path / "nc")
    for key, array in values.items():
        assert_bit_equal(loaded[key], np.ascontiguousarray(array), key)


@pytest.mark.anyio
async def test_array_likes(tmp_path: Path) -> None:
    values = {
        "list_f": [1.5, 2.5],
        "nested_i": [[1, 2, 3], [4, 5, 6]],
        "py_int": 7,
        "py_float": -0.0,
        "py_bool": True,
        "py_str": "héllo",
        "py_bytes": b"\x00raw\xff\x00",
        "list_bytes": [b"a\x00", b"", b"\x00"],
        "list_str": ["ab", "c\x00"],
        "np_str": np.array(["ab", "ü"]),
        "np_str_scalar": np.str_("xyz"),
        "np_bytes": np.array([b"ab", b"c"]),
        "np_scalar": np.float16(1.25),
        "bytearray_in_object": np.array([bytearray(b"q"), memoryview(b"rs")], dtype=object),
        "empty_list": [],
    }
    expected = {
        "list_f": np.array([1.5, 2.5]),
        "nested_i": np.array([[1, 2, 3], [4, 5, 6]]),
        "py_int": np.array(7),
        "py_float": np.array(-0.0),
        "py_bool": np.array(True),
        "py_str": _strings([b"h\xc3\xa9llo"], ()),
        "py_bytes": _strings([b"\x00raw\xff\x00"], ()),
        "list_bytes": _strings([b"a\x00", b"", b"\x00"], (3,)),
        "list_str": _strings([b"ab", b"c\x00"], (2,)),
        "np_str": _strings([b"ab", "ü".encode()], (2,)),
        "np_str_scalar": _strings([b"xyz"], ()),
        "np_bytes": _strings([b"ab", b"c"], (2,)),
        "np_scalar": np.array(1.25, dtype=np.float16),
        "bytearray_in_object": _strings([b"q", b"rs"], (2,)),
        "empty_list": np.array([], dtype=np.float64),
    }
    await anyckpt.save(tmp_path / "al", values, durable=False)
    loaded = await anyckpt.load(tmp_path / "al")
    assert set(loaded) == set(expected)
    for key, array in expected.items():
        assert_bit_equal(loaded[key], array, key)


def _strings(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


def test_unsupported_dtypes_are_refused(tmp_path: Path) -> None:
    for bad in (np.array([1], dtype="datetime64[s]"), np.array([1], dtype=np.longdouble)):
        if bad.dtype == np.float64:  # longdouble is float64 on some platforms
            continue
        with pytest.raises(TypeError):
            anyckpt.sync.save(tmp_path / "bad", {"x": bad}, durable=False)
    assert not (tmp_path / "bad.index").exists()


@pytest.mark.anyio
async def test_nested_dicts_flatten(tmp_path: Path) -> None:
    state = {
        "a": {"b": {"c": np.int32(1)}, "d": np.float32(2)},
        "a/b": {"e": np.int8(3)},
        "top": np.zeros((2, 0)),
        b"raw\xff": {"leaf": [1]},
    }
    await anyckpt.save(tmp_path / "n", state, durable=False)
    loaded = await anyckpt.load(tmp_path / "n")
    assert sorted(loaded) == ["a/b/c", "a/b/e", "a/d", "raw\udcff/leaf", "top"]
    assert loaded["a/b/c"] == 1
    assert loaded["a/b/e"] == 3
    assert loaded["top"].shape == (2, 0)
    with pytest.raises(ValueError, match="same name"):
        await anyckpt.save(tmp_path / "clash", {"a": {"b": 1}, "a/b": 2})
    with pytest.raises(ValueError, match="reserved"):
        await anyckpt.save(tmp_path / "empty", {"": 1})


def test_sync_twins_round_trip(tmp_path: Path) -> None:
    values = {"w": np.arange(12, dtype=np.int16).reshape(3, 4), "s": _strings([b"x"], (1,))}
    anyckpt.sync.save(tmp_path / "s", values, durable=False)
    loaded = anyckpt.sync.load(tmp_path / "s", ["w"])
    assert list(loaded) == ["w"]
    assert_bit_equal(loaded["w"], values["w"])
    with anyckpt.sync.open(tmp_path / "s") as reader:
        assert reader.keys() == ["s", "w"]
        assert reader.spec("w").dtype_name == "int16"
        assert_bit_equal(reader.read("w", index=(slice(1, 3),)), values["w"][1:3])
        assert_bit_equal(reader.read("s"), values["s"])


# -- partial reads --------------------------------------------------------------------------


@st.composite
def indexed_tensor(draw: st.DrawFn) -> tuple[np.ndarray, list[tuple[int | slice, ...]]]:
    dtype_name = draw(st.sampled_from(DTYPE_NAMES))
    shape = draw(array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    array = make_array(dtype_name, shape, draw(st.integers(0, 2**32 - 1)), [1, 2, 3])
    indexes = []
    for _ in range(draw(st.integers(1, 5))):
        index: list[int | slice] = []
        for dim in shape[: draw(st.integers(0, len(shape)))]:
            bound = st.none() | st.integers(-dim - 2, dim + 2)
            if dim and draw(st.booleans()):
                index.append(draw(st.integers(-dim, dim - 1)))
            else:
                index.append(slice(draw(bound), draw(bound)))
        indexes.append(tuple(index))
    return array, indexes


@SETTINGS
@given(case=indexed_tensor(), backend=st.sampled_from(["asyncio", "trio"]))
def test_read_index_equals_numpy_slicing(
    places: Places, case: tuple[np.ndarray, list[tuple[int | slice, ...]]], backend: str
) -> None:
    array, indexes = case
    prefix = places.new()

    async def main() -> None:
        await anyckpt.save(prefix, {"before": np.int8(1), "t": array, "z": [1]}, durable=False)
        async with anyckpt.open(prefix) as reader:
            for index in indexes:
                got = await reader.read("t", index=index)
                assert_bit_equal(got, array[(*index, ...)], index)

    try:
        run(main, backend)
    finally:
        places.cleanup(prefix)


@pytest.mark.anyio
async def test_read_index_errors(tmp_path: Path) -> None:
    await anyckpt.save(tmp_path / "e", {"t": np.zeros((3, 4))}, durable=False)
    async with anyckpt.open(tmp_path / "e") as reader:
        with pytest.raises(IndexError):
            await reader.read("t", index=(3,))
        with pytest.raises(IndexError):
            await reader.read("t", index=(-4,))
        with pytest.raises(IndexError):
            await reader.read("t", index=(slice(None, None, 2),))
        with pytest.raises(IndexError):
            await reader.read("t", index=(0, 0, 0))
        with pytest.raises(KeyError):
            await reader.read("missing")


class ReadLog:
    """Records every (path, offset, length) read through the storage readers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[str, int, int]] = []
        for cls in (LocalReader, FsspecReader):
            self._wrap(monkeypatch, cls)

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        log = self.reads
        original_read, original_into = cls.read, cls.read_into

        depth = threading.local()

        def logged(call: Callable[[], Any], path: str, offset: int, length: int) -> Any:
            # Either may call the other (local read() falls back to read_into() on a short
            # read; fsspec read_into() calls read()): only the outermost call is counted.
            outer = not getattr(depth, "n", 0)
            if outer:
                log.append((path, offset, length))
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return call()
            finally:
                depth.n -= 1

        def read(self: Any, offset: int, length: int) -> bytes:
            return logged(  # type: ignore[no-any-return]
                lambda: original_read(self, offset, length), self.path, offset, length
            )

        def read_into(self: Any, offset: int, buffer: Any) -> None:
            nbytes = memoryview(buffer).nbytes
            logged(lambda: original_into(self, offset, buffer), self.path, offset, nbytes)

        monkeypatch.setattr(cls, "read", read)
        monkeypatch.setattr(cls, "read_into", read_into)

    def data_reads(self) -> Iterator[tuple[int, int]]:
        for path, offset, length in self.reads:
            if ".data-" in path:
                yield offset, length


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, size) ranges as merged [start, stop) intervals."""
    out: list[tuple[int, int]] = []
    for offset, size in sorted(ranges):
        if out and out[-1][1] == offset:
            out[-1] = (out[-1][0], offset + size)
        else:
            out.append((offset, offset + size))
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "local"])
async def test_reading_a_subset_reads_only_those(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    places = Places(kind, tmp_path)
    prefix = places.new()
    values = {f"k{i}": make_array(name, (3, 2), i, []) for i, name in enumerate(DTYPE_NAMES)}
    await anyckpt.save(prefix, values, durable=False)
    try:
        with fsspec.open(prefix + ".index", "rb") as f:
            index = read_table(f.read())
        entries = {k.decode(): decode_entry(v) for k, v in index[1:]}
        for wanted in (["k3"], ["k0", "k15"], ["k15", "k1", "k2"]):
            log = ReadLog(monkeypatch)
            loaded = await anyckpt.load(prefix, keys=wanted)
            assert list(loaded) == wanted
            for key in wanted:
                assert_bit_equal(loaded[key], values[key], key)
            allowed = _merge([(entries[k].offset, entries[k].size) for k in wanted])
            reads = list(log.data_reads())
            assert reads
            for offset, length in reads:
                # One read may cover neighbours that were both asked for (coalesced).
                assert any(a <= offset and offset + length <= b for a, b in allowed), (
                    wanted,
                    offset,
                    length,
                )
            assert sum(n for _, n in reads) == sum(entries[k].size for k in wanted)
            monkeypatch.undo()
        # A partial box of one tensor reads only bytes inside that tensor.
        log = ReadLog(monkeypatch)
        async with anyckpt.open(prefix) as reader:
            got = await reader.read("k2", index=(slice(1, 2),))
        assert_bit_equal(got, values["k2"][1:2])
        a, b = entries["k2"].offset, entries["k2"].offset + entries["k2"].size
        reads = list(log.data_reads())
        assert reads
        assert all(a <= o and o + n <= b for o, n in reads)
        assert sum(n for _, n in reads) < b - a
    finally:
        monkeypatch.undo()
        places.cleanup(prefix)


@pytest.mark.anyio
async def test_subset_load_ignores_damage_elsewhere(tmp_path: Path) -> None:
    values = {name: make_array(name, (4,), 1, []) for name in ("float32", "int64", "string")}
    await anyckpt.save(tmp_path / "d", values, durable=False)
    entries = {
        k.decode(): decode_entry(v) for k, v in read_table((tmp_path / "d.index").read_bytes())[1:]
    }
    data_file = tmp_path / "d.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    data[entries["int64"].offset] ^= 0xFF
    data_file.write_bytes(bytes(data))
    for keys in itertools.permutations(["float32", "string"]):
        loaded = await anyckpt.load(tmp_path / "d", keys=list(keys))
        for key in keys:
            assert_bit_equal(loaded[key], values[key], key)
    with pytest.raises(anyckpt.CorruptCheckpointError, match="int64"):
        await anyckpt.load(tmp_path / "d")

"""The V1 save written column-wise (formats.v1_columns, codecs.v1_packed): the same bytes as
the per-tensor encoders and the streaming writer, which files take which path, a table
whose first block the caller writes, and a cancelled write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt.errors
import anyckpt.sync
import anyckpt.tensors
from anyckpt.codecs import v1 as codec
from anyckpt.codecs import v1_packed
from anyckpt.codecs.dtypes import enum_from_dtype, to_little_endian
from anyckpt.codecs.ordered_code import encode_tensor_name_slice
from anyckpt.codecs.packed import Column, PackedBytes
from anyckpt.codecs.table import TableBuilder, block_trailer
from anyckpt.codecs.table_packed import TableBuild
from anyckpt.formats import v1 as v1_format
from anyckpt.formats import v1_columns
from anyckpt.partitioned import Partitioned
from anyckpt.storage import Storage

DTYPES = [
    "<f4",
    "<f8",
    ">f4",
    ">f8",
    "<i4",
    "<i8",
    "u1",
    "<i2",
    "i1",
    "<u2",
    "?",
    "<f2",
    "<c8",
    "<c16",
    ">c8",
    "O",
]
SHAPES = [(), (0,), (1,), (4,), (3, 2), (2, 0, 3), (1, 1, 1, 5), (130,)]


def _array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape, dtype=np.int64))
    if dtype == "O":
        values = [
            bytes(rng.integers(0, 256, int(rng.integers(0, 6))).astype(np.uint8))
            for _ in range(size)
        ]
        out = np.empty(size, dtype=object)
        out[:] = values
        return out.reshape(shape)
    if dtype == "?":
        return rng.random(shape) > 0.5
    kind = np.dtype(dtype).kind
    if kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    if kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(np.dtype(dtype))
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


names = st.text(
    st.characters(blacklist_categories=["Cs"], min_codepoint=0, max_codepoint=0x2FF),
    min_size=1,
    max_size=12,
)
tensor_specs = st.dictionaries(
    names,
    st.tuples(st.sampled_from(DTYPES), st.sampled_from(SHAPES), st.integers(0, 2**16)),
    max_size=40,
)


def _plan_of(state: dict[str, np.ndarray]) -> v1_columns.ColumnPlan:
    packed, order = anyckpt.tensors.stored_key_order(tuple(state))
    values = list(state.values())
    plan = v1_columns.plan([(packed, [values[i] for i in order.tolist()])])
    assert plan is not None
    return plan


def _state(specs: dict[str, tuple[str, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
    return {name: _array(dtype, shape, seed) for name, (dtype, shape, seed) in specs.items()}


@settings(max_examples=60, deadline=None)
@given(tensor_specs)
def test_encoders_match_the_per_tensor_ones(specs: dict[str, Any]) -> None:
    """The meta, slice keys and entry values made column-wise are the bytes of
    encode_meta, encode_tensor_name_slice and encode_slice_entry, tensor by tensor."""
    state = _state(specs)
    plan = _plan_of(state)
    file = plan.files[0]
    packed = file.names
    assert packed is not None
    ordered = list(packed)
    arrays = [state[raw.decode("utf-8")] for raw in ordered]
    kinds, kind_ids = plan.kinds, file.kind_ids
    data = np.frombuffer(packed.data, dtype=np.uint8)

    def names_of(low: int, high: int) -> Column:
        return Column(data, packed.starts[low:high], packed.lengths[low:high])

    enums = [plan.enums[k] for k in kind_ids.tolist()]
    assert enums == [enum_from_dtype(a.dtype) for a in arrays]
    metas = [
        codec.MetaTensor(raw, e, a.shape, (codec.whole(a.ndim),))
        for raw, a, e in zip(ordered, arrays, enums, strict=True)
    ]
    count = len(ordered)
    assert b"".join(v1_packed.meta_pieces(names_of, count, kinds, kind_ids)) == codec.encode_meta(
        metas
    )

    wanted_keys = [
        encode_tensor_name_slice(raw, codec.whole(a.ndim))
        for raw, a in zip(ordered, arrays, strict=True)
    ]
    if not v1_packed.has_escapes(packed):
        keys = v1_packed.SliceKeys(packed, kinds, kind_ids)
        assert list(keys.part(0, count)) == wanted_keys
        assert [keys[i] for i in range(count)] == wanted_keys
        assert keys[:] == wanted_keys
        if count > 2:
            assert list(keys.part(1, count - 1)) == wanted_keys[1:-1]
    else:
        assert any(0 in raw or 0xFF in raw for raw in ordered)

    direct = kinds.direct[kind_ids]
    others = {}
    gathered = []
    for i, (raw, a, e) in enumerate(zip(ordered, arrays, enums, strict=True)):
        if direct[i]:
            gathered.append(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        else:
            data_ = a if a.dtype == object else to_little_endian(a)
            others[i] = b"".join(
                bytes(p) for p in codec.encode_slice_entry(raw, codec.whole(a.ndim), data_, e)[1]
            )
    joined = np.concatenate(gathered) if gathered else np.zeros(0, np.uint8)
    values = v1_packed.entry_values(names_of(0, count), kinds, kind_ids, joined, others)
    for i, (raw, a, e) in enumerate(zip(ordered, arrays, enums, strict=True)):
        data_ = a if a.dtype == object else to_little_endian(a)
        _, parts = codec.encode_slice_entry(raw, codec.whole(a.ndim), data_, e)
        assert values.item(i) == b"".join(bytes(p) for p in parts)


def _save_both(
    tmp_path: Path, state: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[list[str], list[str]]:
    """Save ``state`` column-wise and with the streaming writer; the files of each."""
    taken: list[str] = []
    original = v1_columns.write_file

    def spy(*args: Any, **kwargs: Any) -> None:
        taken.append(args[1])
        original(*args, **kwargs)

    monkeypatch.setattr(v1_columns, "write_file", spy)
    columns = anyckpt.sync.save(
        str(tmp_path / "columns" / name), state, format="v1", durable=False, **kw
    )
    assert taken, "the column-wise writer was not used"
    with monkeypatch.context() as m:
        m.setattr(v1_format, "_column_plan", lambda tensors, opts: None)
        streamed = anyckpt.sync.save(
            str(tmp_path / "streamed" / name), state, format="v1", durable=False, **kw
        )
    return columns, streamed


def _same_files(a: list[str], b: list[str]) -> None:
    assert [os.path.basename(p) for p in a] == [os.path.basename(p) for p in b]
    for x, y in zip(a, b, strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes(), os.path.basename(x)


@settings(max_examples=25, deadline=None)
@given(tensor_specs.filter(bool))
def test_column_save_writes_the_streaming_writers_bytes(
    tmp_path_factory: pytest.TempPathFactory, specs: dict[str, Any]
) -> None:
    tmp_path = tmp_path_factory.mktemp("v1cols")
    state = _state(specs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        columns, streamed = _save_both(tmp_path, state, "c", monkeypatch)
    _same_files(columns, streamed)
    back = anyckpt.sync.load(columns[0])
    for key, array in state.items():
        np.testing.assert_array_equal(back[key], array)


@pytest.mark.parametrize("count", [9_000, 20_000])
def test_meta_alone_in_its_block_and_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """A meta of a block or more (written by the caller before the table's pieces), several
    meta chunks and table ranges, mixed kinds (direct and not), three shards."""
    monkeypatch.setattr(v1_packed, "META_CHUNK", 1000)
    state = {
        f"layer{i // 10:05d}/w{i % 10}": _array(DTYPES[i % 15], SHAPES[i % len(SHAPES)], i)
        for i in range(count)
    }
    columns, streamed = _save_both(tmp_path, state, "one", monkeypatch)
    _same_files(columns, streamed)
    assert os.path.getsize(columns[0]) > 256 * 1024
    columns, streamed = _save_both(tmp_path, state, "three", monkeypatch, options={"num_shards": 3})
    assert len(columns) == 3
    _same_files(columns, streamed)


@pytest.mark.parametrize("count", [100, 9_000])
def test_large_tensors_written_entry_by_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """A file holding tensors of COLUMNS_BELOW bytes or more (float32, int32, strings)
    among small ones of every kind: the streaming writer's bytes."""
    monkeypatch.setattr(v1_columns, "_STREAMED_CHUNK", 1000)
    state = {f"s{i:05d}": _array(DTYPES[i % 16], SHAPES[i % len(SHAPES)], i) for i in range(count)}
    n = v1_columns.COLUMNS_BELOW // 4
    state["s00050/big"] = np.arange(n, dtype=np.float32)
    state["s00051/big"] = np.arange(n + 7, dtype=">i4")
    strings = np.empty(n // 2, dtype=object)
    strings[:] = [b"x" * (i % 5) for i in range(n // 2)]
    state["s00052/big"] = strings
    state["zz\x00big"] = np.ones((n // 64, 64), np.float64)
    columns, streamed = _save_both(tmp_path, state, "large", monkeypatch)
    _same_files(columns, streamed)
    back = anyckpt.sync.load(columns[0])
    np.testing.assert_array_equal(back["s00051/big"], state["s00051/big"])


def test_escaped_names_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"k\x00{i:05d}": np.full(2, i, np.float32) for i in range(10_000)}
    columns, streamed = _save_both(tmp_path, state, "esc", monkeypatch)
    _same_files(columns, streamed)


def test_which_files_are_written_column_wise() -> None:
    opts = v1_format.ShardOptions.from_options(None)
    plain = {"a": np.ones(3, np.float32), "b": np.array([b"x"], dtype=object)}
    assert v1_format._column_plan(plain, opts) is not None
    part = Partitioned.split(np.ones((4, 2), np.float32), 2)
    assert v1_format._column_plan(plain | {"p": part}, opts) is None
    big = np.zeros(v1_columns.COLUMNS_BELOW // 4, np.float32)
    with_big = v1_format._column_plan(plain | {"big": big}, opts)
    assert with_big is not None
    assert with_big.files[0].large  # written entry by entry
    below = v1_format._column_plan(plain | {"big": big[:-1]}, opts)
    assert below is not None
    assert not below.files[0].large
    assert v1_format._column_plan(plain | {"bf": np.ones(2, ml_dtypes.bfloat16)}, opts) is None
    assert v1_format._column_plan(plain | {"\udcff": np.ones(1, np.float32)}, opts) is None
    assert v1_format._column_plan({"é": np.ones(1, np.float32)}, opts) is not None


def test_unsupported_dtype_and_name_still_refused(tmp_path: Path) -> None:
    with pytest.raises(anyckpt.errors.UnsupportedFormatError, match="bfloat16"):
        anyckpt.sync.save(str(tmp_path / "bf"), {"a": np.ones(2, ml_dtypes.bfloat16)}, format="v1")
    with pytest.raises(anyckpt.errors.UnsupportedFormatError, match="UTF-8"):
        anyckpt.sync.save(str(tmp_path / "n"), {"\udce2": np.ones(2, np.float32)}, format="v1")


@pytest.mark.parametrize("count", [0, 1, 5000])
def test_table_with_a_first_block_written_by_the_caller(count: int) -> None:
    """TableBuild's first_block: the caller's block of one entry (key b"", a value that
    fills a block) then the pieces are the bytes TableBuilder writes for all the entries."""
    first = bytes(range(256)) * 1100
    keys = [b"k%06d" % i for i in range(count)]
    values = [b"v" * (i % 40) for i in range(count)]
    builder = TableBuilder()
    builder.add(b"", first)
    for k, v in zip(keys, values, strict=True):
        builder.add(k, v)
    expected = builder.finish()
    head = codec.encode_varint(0) * 2 + codec.encode_varint(len(first))
    size = len(head) + len(first) + 8
    assert size >= 256 * 1024  # alone in its block
    block = head + first + b"\0\0\0\0\x01\0\0\0"
    packed = PackedBytes.join(keys, len(keys), increasing=True)
    column = Column(
        np.frombuffer(b"".join(values), np.uint8),
        np.cumsum([0, *(len(v) for v in values[:-1])], dtype=np.int64)[: len(values)],
        np.array([len(v) for v in values], dtype=np.int64),
    )
    build = TableBuild(packed, column, layout=False, first_block=(b"", size))
    table = block + block_trailer(block) + b"".join(build.pieces())
    assert table == expected


def test_cancelled_write_aborts(tmp_path: Path) -> None:
    state = {f"t{i:05d}": np.ones(4, np.float32) for i in range(50_000)}
    plan = _plan_of(state)
    storage, root = Storage.from_url(str(tmp_path))
    calls = []

    def cancel() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        v1_columns.write_file(
            storage,
            os.path.join(root, "c"),
            plan.files[0],
            False,
            cancel,
            lambda w: None,
            columns=plan,
        )
    assert len(calls) == 3
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scale", [1, 10])
def test_ranges_stop_at_a_byte_budget(monkeypatch: pytest.MonkeyPatch, scale: int) -> None:
    """With value_sizes (exact, or ten times too large), each range's values stop at about
    _RANGE_BYTES (not 16,384 entries of 100 kB), and the table is TableBuilder's."""
    from anyckpt.codecs import table_packed

    monkeypatch.setattr(table_packed, "_RANGE_BYTES", 1 << 20)
    values = [bytes([i % 251]) * 100_000 for i in range(60)]
    keys = [b"key%04d" % i for i in range(60)]
    builder = TableBuilder()
    for k, v in zip(keys, values, strict=True):
        builder.add(k, v)
    asked: list[int] = []

    def make(low: int, high: int) -> Column:
        asked.append(sum(map(len, values[low:high])))
        part = values[low:high]
        return Column(
            np.frombuffer(b"".join(part), np.uint8),
            np.arange(len(part), dtype=np.int64) * 100_000,
            np.full(len(part), 100_000, np.int64),
        )

    def sizes(low: int, high: int) -> np.ndarray:
        return np.full(high - low, 100_000 * scale, np.int64)

    build = TableBuild(keys, make, layout=False, value_sizes=sizes)
    assert b"".join(build.pieces()) == builder.finish()
    assert max(asked) <= (1 << 20) + 100_000

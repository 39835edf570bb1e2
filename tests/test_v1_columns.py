"""The V1 reader's tensors as columns (:mod:`anyckpt.formats.v1_tensors`): for any mix of whole,
partitioned, sharded and non-ASCII tensors, and for metas not in key order or naming a tensor
in several files, the reader lists, describes and reads exactly what a plain dict of every
file's decoded meta (the reference: the reader before the columns) says."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyckpt
import anyckpt.sync
from anyckpt.codecs import v1 as codec
from anyckpt.codecs.dtypes import dtype_from_enum
from anyckpt.codecs.ordered_code import encode_tensor_name_slice
from anyckpt.codecs.table import TableBuilder, read_table
from anyckpt.errors import CorruptCheckpointError
from anyckpt.partitioned import Partitioned
from anyckpt.tensors import key_from_bytes, key_to_bytes

names = st.text(alphabet=st.sampled_from("abz/_0:é日"), min_size=1, max_size=8).filter(
    lambda s: s.isprintable()
)


def reference(files: list[Path]) -> dict[str, tuple[int, tuple[int, ...], set[tuple[object, int]]]]:
    """name -> (dtype, shape, {(extents, file)}) from every file's decoded meta."""
    out: dict[str, tuple[int, tuple[int, ...], set[tuple[object, int]]]] = {}
    for index, path in enumerate(files):
        raw = path.read_bytes()
        meta = codec.decode_meta(dict(read_table(raw))[b""])
        for m in meta:
            key = key_from_bytes(m.name)
            _, _, slices = out.setdefault(key, (m.dtype, m.shape, set()))
            slices.update((e, index) for e in m.slices)
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keys=st.lists(names, min_size=1, max_size=12, unique=True),
    partitioned=st.sets(st.integers(0, 11)),
    num_shards=st.integers(1, 3),
)
def test_saved_checkpoints_read_as_their_metas_say(
    tmp_path_factory: pytest.TempPathFactory,
    keys: list[str],
    partitioned: set[int],
    num_shards: int,
) -> None:
    tensors: dict[str, object] = {}
    for i, key in enumerate(keys):
        array = np.arange(4 * (i + 1), dtype=np.float32).reshape(4, i + 1)
        tensors[key] = Partitioned.split(array, 2) if i in partitioned else array
    path = tmp_path_factory.mktemp("cols") / "ckpt"
    options = {"num_shards": num_shards} if num_shards > 1 else None
    anyckpt.sync.save(str(path), tensors, format="v1", durable=False, options=options)
    with anyckpt.sync.open(str(path)) as reader:
        files = [Path(f) for f in reader.files()]
        ref = reference(files)
        assert reader.keys() == sorted(ref, key=key_to_bytes)
        for key, (dtype, shape, slices) in ref.items():
            assert reader.spec(key).dtype == dtype_from_enum(dtype)
            spec = reader.spec(key)
            assert spec.shape == shape
            if spec.partitions:
                assert {p.extents for p in spec.partitions} == {e for e, _ in slices}
            else:
                assert len(slices) == 1
        loaded = reader.read_many()
    for i, key in enumerate(keys):
        expected = np.arange(4 * (i + 1), dtype=np.float32).reshape(4, i + 1)
        np.testing.assert_array_equal(loaded[key], expected)


def write_file(path: Path, metas: list[codec.MetaTensor], values: dict[str, np.ndarray]) -> None:
    """A V1 file whose meta lists ``metas`` in the order given (TF and anyckpt sort it)."""
    table = TableBuilder()
    table.add(b"", codec.encode_meta(metas))
    entries = []
    for m in metas:
        for extents in m.slices:
            array = values[key_from_bytes(m.name)]
            box = tuple(slice(s, s + n) if n != -1 else slice(None) for s, n in extents)
            _, value = codec.encode_slice_entry(m.name, extents, array[box], m.dtype)
            entries.append((encode_tensor_name_slice(m.name, extents), b"".join(map(bytes, value))))
    for key, value in sorted(entries):
        table.add(key, value)
    path.write_bytes(table.finish())


@given(order=st.permutations(range(6)))
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_meta_not_in_key_order_and_a_tensor_over_two_files(
    tmp_path_factory: pytest.TempPathFactory, order: list[int]
) -> None:
    directory = tmp_path_factory.mktemp("unsorted")
    values = {f"k{i}": np.full((2, 3), i, dtype=np.float32) for i in range(6)}
    whole = codec.whole(2)
    metas = [codec.MetaTensor(f"k{i}".encode(), 1, (2, 3), (whole,)) for i in range(6)]
    # "k2" is split over both files: a row in file 0, a row in file 1.
    metas[2] = codec.MetaTensor(b"k2", 1, (2, 3), (((0, 1), (0, -1)),))
    other = codec.MetaTensor(b"k2", 1, (2, 3), (((1, 1), (0, -1)),))
    write_file(directory / "c-00000-of-00002", [metas[i] for i in order], values)
    write_file(directory / "c-00001-of-00002", [other], values)
    loaded = anyckpt.sync.load(str(directory / "c"))
    assert list(loaded) == [f"k{i}" for i in range(6)]
    for key, value in values.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_a_whole_tensor_in_two_files_is_an_overlap(tmp_path: Path) -> None:
    values = {"a": np.ones(3, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    a = codec.MetaTensor(b"a", 1, (3,), (codec.whole(1),))
    b = codec.MetaTensor(b"b", 1, (3,), (codec.whole(1),))
    write_file(tmp_path / "c-00000-of-00002", [a, b], values)
    write_file(tmp_path / "c-00001-of-00002", [b], values)
    with pytest.raises(CorruptCheckpointError, match="stored slices of 'b' overlap"):
        anyckpt.sync.load(str(tmp_path / "c"))


def test_a_tensor_of_two_dtypes_across_files_is_refused(tmp_path: Path) -> None:
    values = {"a": np.ones(3, dtype=np.float32)}
    write_file(
        tmp_path / "c-00000-of-00002",
        [codec.MetaTensor(b"a", 1, (3,), (((0, 1),),))],
        values,
    )
    write_file(
        tmp_path / "c-00001-of-00002",
        [codec.MetaTensor(b"a", 2, (3,), (((1, 2),),))],
        {"a": np.ones(3, dtype=np.float64)},
    )
    with pytest.raises(CorruptCheckpointError, match="in another file"):
        anyckpt.sync.load(str(tmp_path / "c"))


def test_a_full_read_of_small_tensors_keeps_no_block_nor_tracked_object_per_tensor(
    tmp_path: Path,
) -> None:
    """Small tensors are copied out of their 256 KiB block (issue 18): a view would keep the
    block and a memoryview (tracked by the garbage collector) alive per tensor, and every full
    collection during a read of 10^6 tensors walked all of those made so far (135 s, 70 s
    with the collector off)."""
    n = 2000
    tensors = {f"v/{i:05d}": np.full(4, i, np.float32) for i in range(n)}
    tensors["big"] = np.arange(1 << 15, dtype=np.float64)  # 256 KiB: may stay a view
    anyckpt.sync.save(tmp_path / "c", tensors, format="v1")
    assert len(anyckpt.sync.load(tmp_path / "c")) == n + 1  # a first read: one-time objects
    gc.collect()
    before = len(gc.get_objects())
    loaded = anyckpt.sync.load(tmp_path / "c")
    gc.collect()
    assert (len(gc.get_objects()) - before) / n < 0.1
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)
        if value.nbytes <= 1 << 10:
            assert loaded[key].flags.writeable
            assert not isinstance(loaded[key].base, memoryview), key

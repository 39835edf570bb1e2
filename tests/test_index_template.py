"""Indexes patched from a template (the same structure saved again) are byte for byte the
indexes built from scratch; anything that changes the layout builds anew."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt import tensors
from anyckpt._recent import RecentCache
from anyckpt.codecs.bundle import decode_entry
from anyckpt.codecs.dtypes import enum_from_dtype
from anyckpt.codecs.packed import bytes_column
from anyckpt.codecs.table import read_table
from anyckpt.codecs.table_packed import (
    build_table_packed,
    build_table_with_layout,
    replace_value_tails,
)
from anyckpt.formats import v2_index
from anyckpt.formats.v2_data import DataFileEntries
from anyckpt.formats.v2_index import build_index
from anyckpt.tensors import key_to_bytes, stored_key_order

DT_FLOAT = enum_from_dtype(np.dtype(np.float32))
DT_INT64 = enum_from_dtype(np.dtype(np.int64))


@pytest.fixture(autouse=True)
def _no_templates() -> None:
    v2_index._TEMPLATES.clear()


def _fresh(num_shards: int, entries: DataFileEntries) -> bytes:
    """The index built from scratch (with no template), the templates left as they were."""
    kept = v2_index._TEMPLATES
    v2_index._TEMPLATES = RecentCache(kept.size)
    try:
        return build_index(num_shards, [entries])
    finally:
        v2_index._TEMPLATES = kept


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=40), unique=True, max_size=300).map(sorted),
    st.data(),
    st.sampled_from([1, 64, 300, 4096]),
)
def test_replaced_tails_equal_a_fresh_build(
    keys: list[bytes], data: st.DataObject, block_size: int
) -> None:
    values = [data.draw(st.binary(min_size=4, max_size=60)) for _ in keys]
    table, layout = build_table_with_layout(keys, bytes_column(values), block_size=block_size)
    assert table == build_table_packed(keys, bytes_column(values), block_size=block_size)
    chosen = sorted(data.draw(st.sets(st.sampled_from(range(len(keys))))) if keys else set())
    tails = [data.draw(st.binary(min_size=4, max_size=4)) for _ in chosen]
    changed = list(values)
    for i, tail in zip(chosen, tails, strict=True):
        changed[i] = changed[i][:-4] + tail
    rows = np.frombuffer(b"".join(tails), np.uint8).reshape(-1, 4)
    patched = replace_value_tails(table, layout, np.array(chosen, np.int64), rows)
    assert patched == build_table_packed(keys, bytes_column(changed), block_size=block_size)
    assert read_table(patched) == list(zip(keys, changed, strict=True))


def _entries(
    keys: list[bytes], shapes: list[tuple[int, ...]], crcs: list[int], dtype: int = DT_FLOAT
) -> DataFileEntries:
    sizes = np.array([4 * int(np.prod(s)) for s in shapes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return DataFileEntries.from_lists(
        0, keys, [dtype] * len(keys), shapes, offsets, sizes, np.array(crcs, np.uint32)
    )


structures = st.lists(
    st.tuples(
        st.text("abc/", min_size=1, max_size=30).map(str.encode),
        st.lists(st.integers(0, 300), max_size=3).map(tuple),
    ),
    unique_by=lambda kv: kv[0],
    min_size=1,
    max_size=200,
).map(sorted)
crc_lists = st.lists(st.integers(0, 2**32 - 1), min_size=200, max_size=200)


@settings(max_examples=150, deadline=None)
@given(structures, crc_lists, crc_lists)
def test_the_same_structure_again_is_patched_to_the_fresh_bytes(
    structure: list[tuple[bytes, tuple[int, ...]]], first: list[int], second: list[int]
) -> None:
    keys = [k for k, _ in structure]
    shapes = [s for _, s in structure]
    n = len(keys)
    one = _entries(keys, shapes, [c or 1 for c in first[:n]])
    two = _entries(keys, shapes, second[:n])  # may hold a zero: then built anew
    assert build_index(1, [one]) == _fresh(1, one)
    again = build_index(1, [two])
    assert again == _fresh(1, two)
    table = dict(read_table(again))
    for key, crc in zip(keys, second[:n], strict=True):
        assert decode_entry(table[key]).crc32c == crc


def test_a_changed_layout_is_built_anew() -> None:
    """Each change is checked against the template of the original structure."""
    keys = [f"w/{i:03d}".encode() for i in range(50)]
    shapes = [(3, 4)] * 50
    crcs = list(range(1, 51))
    moved = _entries(keys, shapes, crcs)
    moved.shard_id = 3
    for num_shards, changed in (
        (1, _entries(keys, [(3, 5), *shapes[1:]], crcs)),  # a shape, so offsets and sizes
        (1, _entries(keys, [(4, 3), *shapes[1:]], crcs)),  # a shape only
        (1, _entries(keys, shapes, crcs, dtype=DT_INT64)),  # the dtypes
        (1, moved),  # the shard
        (4, moved),  # the shard and the header
    ):
        v2_index._TEMPLATES.clear()
        build_index(1, [_entries(keys, shapes, crcs)])
        assert len(v2_index._TEMPLATES) == 1
        assert build_index(num_shards, [changed]) == _fresh(num_shards, changed)


def test_templates_are_bounded() -> None:
    for n in range(1, 3 * v2_index._TEMPLATES.size):
        keys = [f"k{i:03d}".encode() for i in range(n)]
        build_index(1, [_entries(keys, [(2,)] * n, [7] * n)])
    assert len(v2_index._TEMPLATES) == v2_index._TEMPLATES.size


def test_huge_structures_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [f"w/{i:04d}".encode() for i in range(1000)]
    monkeypatch.setattr(v2_index, "_TEMPLATE_MAX_BYTES", 10_000)
    one = _entries(keys, [(2,)] * 1000, [5] * 1000)
    assert build_index(1, [one]) == _fresh(1, one)
    assert not v2_index._TEMPLATES  # built, not kept
    monkeypatch.setattr(tensors, "_ORDER_MAX_BYTES", 1000)
    tensors._ORDERS.clear()
    names = [k.decode() for k in keys]
    assert list(stored_key_order(names)[0]) == keys
    assert not tensors._ORDERS
    assert list(stored_key_order(names[:10])[0]) == keys[:10]
    assert len(tensors._ORDERS) == 1  # small ones still are


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(max_size=8)  # any code points, lone surrogates too
        | st.binary(max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape")),
        unique=True,
        max_size=50,
    )
)
def test_stored_key_order_is_the_bytewise_order(keys: list[str]) -> None:
    try:
        expected = sorted(map(key_to_bytes, keys))
    except UnicodeEncodeError:  # lone surrogates that stand for no byte
        with pytest.raises(UnicodeEncodeError):
            stored_key_order(keys)
        return
    for _ in range(2):  # computed, then remembered
        raws, order = stored_key_order(keys)
        assert list(raws) == expected
        assert [key_to_bytes(keys[i]) for i in order] == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=10)  # ASCII, NUL too
        | st.text(max_size=6),  # and not
        unique=True,
        max_size=60,
    )
)
def test_names_sorted_as_a_matrix_match_the_general_path(keys: list[str]) -> None:
    """Many ASCII names are sorted as a fixed-width NumPy matrix (tensors._ascii_order; from
    1 name here): the same packed names and order as the general path, or no answer (NUL,
    non-ASCII, very uneven lengths) and the general path is taken."""
    names = tuple(keys)
    try:
        general = tensors._general_order(names)
    except UnicodeEncodeError:
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensors, "_MATRIX_MIN_NAMES", 1)
        matrix = tensors._ascii_order(names)
    if matrix is None:  # (also empty names only, or very uneven lengths)
        return
    assert all(k.isascii() and "\0" not in k for k in names)
    assert list(matrix[0]) == list(general[0])
    assert matrix[0].increasing
    np.testing.assert_array_equal(matrix[1], general[1])
    assert matrix[1].dtype == np.int32  # 4 bytes a name
    assert not matrix[1].flags.writeable


def test_saving_the_same_structure_again_stores_the_new_values(tmp_path: object) -> None:
    """Step after step, one structure, new values: each checkpoint holds its own values and
    CRCs (checked on load), and its index is the one built from scratch."""
    rng = np.random.default_rng(1)
    names = [f"model/layer_{i:03d}/{p}" for i in range(40) for p in ("kernel", "bias")]
    for step in range(3):
        state = {n: rng.standard_normal(8).astype(np.float32) for n in names}
        prefix = f"{tmp_path}/ckpt-{step}"
        anyio.run(lambda p=prefix, s=state: anyckpt.save(p, s, durable=False))  # type: ignore[misc]
        loaded = anyio.run(anyckpt.load, prefix)
        assert set(loaded) == set(names)
        for n in names:
            np.testing.assert_array_equal(loaded[n], state[n])
    assert len(v2_index._TEMPLATES) == 1

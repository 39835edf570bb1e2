"""The data writer's entry columns, kept until the index is built, are as narrow as their
values allow (uint32 offsets and sizes below 4 GiB, uint8/uint16 kind numbers), hold the
same numbers as the int64 ones, and give the same index bytes."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.formats import v2_index
from anyckpt.formats.v2_data import DataFileEntries, _entries, _narrow_ids
from anyckpt.tensors import stored_key_order


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 << 30), max_size=40), st.data())
def test_narrow_columns_hold_the_int64_numbers(sizes: list[int], data: st.DataObject) -> None:
    count = len(sizes)
    wide_sizes = np.array(sizes, dtype=np.int64)
    crcs = np.array(data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=count, max_size=count)))
    premasked = np.array(data.draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    keys = [b"k%03d" % i for i in range(count)]
    kind_ids = np.zeros(count, np.int32)
    entries = _entries(
        0, keys, kind_ids, [(1, (2,))], wide_sizes, crcs.astype(np.uint32), premasked.astype(bool)
    )
    expected_offsets = np.concatenate([[0], np.cumsum(wide_sizes)[:-1]]) if count else []
    assert entries.sizes.tolist() == sizes
    assert entries.offsets.tolist() == list(map(int, expected_offsets))
    small = sum(sizes) < 2**32
    assert entries.offsets.dtype == (np.uint32 if small else np.int64)
    assert entries.sizes.dtype == entries.offsets.dtype
    assert entries.kind_ids.dtype == np.uint8


def test_kind_numbers_narrowed_by_how_many_kinds() -> None:
    ids = np.array([0, 1, 255], np.int32)
    assert _narrow_ids(ids, 256).dtype == np.uint8
    assert _narrow_ids(ids, 257).dtype == np.uint16
    assert _narrow_ids(ids, 1 << 16).dtype == np.uint16
    wide = _narrow_ids(ids, (1 << 16) + 1)
    assert wide.dtype == np.int32
    assert wide.tolist() == ids.tolist()
    assert wide is not ids


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 200), min_size=1, max_size=300),
    st.integers(1, 5),
    st.booleans(),
)
def test_index_of_narrow_columns_is_the_index_of_wide_ones(
    sizes: list[int], kinds: int, big_offsets: bool
) -> None:
    count = len(sizes)
    names = tuple(f"t/{i:04d}" for i in range(count))
    packed, _ = stored_key_order(names)
    rng = np.random.default_rng(count)
    kind_ids = (np.arange(count) % kinds).astype(np.int32)
    kind_list = [(1, (k + 1,)) for k in range(kinds)]
    wide_sizes = np.array(sizes, np.int64)
    crcs = rng.integers(1, 2**32, count, dtype=np.uint32)
    entries = _entries(0, packed, kind_ids, kind_list, wide_sizes, crcs, np.ones(count, bool))
    wide = dataclasses.replace(
        entries,
        kind_ids=kind_ids,
        offsets=entries.offsets.astype(np.int64) + (5 << 32 if big_offsets else 0),
        sizes=wide_sizes,
    )
    if big_offsets:  # past 4 GiB: the narrow ones are int64 then, with the same numbers
        entries = dataclasses.replace(entries, offsets=wide.offsets)
    v2_index._TEMPLATES.clear()
    narrow_index = v2_index.build_index(1, [entries])
    v2_index._TEMPLATES.clear()
    assert narrow_index == v2_index.build_index(1, [wide])
    # A template kept from the narrow columns serves the wide ones, and back.
    assert v2_index.build_index(1, [wide]) == narrow_index
    assert isinstance(entries, DataFileEntries)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), st.data(), st.integers(1, 64))
def test_mask_in_place_is_mask_many(values: list[int], data: st.DataObject, chunk: int) -> None:
    from anyckpt.codecs import crc

    crcs = np.array(values, dtype=np.uint32)
    skip = np.array(data.draw(st.lists(st.booleans(), min_size=len(crcs), max_size=len(crcs))))
    expected = np.where(skip.astype(bool), crcs, crc.mask_many(crcs))
    old = crc._MASK_CHUNK
    crc._MASK_CHUNK = chunk  # (a module constant: hypothesis runs share it)
    try:
        crc.mask_in_place(crcs, skip.astype(bool))
        assert crcs.tolist() == expected.tolist()
        again = np.array(values, dtype=np.uint32)
        crc.mask_in_place(again)
        assert again.tolist() == crc.mask_many(np.array(values, np.uint32)).tolist()
    finally:
        crc._MASK_CHUNK = old


def test_sizes_widen_for_a_tensor_of_4_gib_or_more() -> None:
    from anyckpt.formats.v2_data import Numbering, _with_size, kinds_and_sizes

    huge = np.broadcast_to(np.zeros(1, np.float64), (1 << 29,))  # 4 GiB, no memory
    arrays = [np.zeros(3, np.float32)] * 5000 + [huge, np.zeros(2, np.int8)]
    kind_ids, sizes = kinds_and_sizes(arrays, Numbering())
    assert sizes.dtype == np.int64
    assert sizes.tolist() == [12] * 5000 + [1 << 32, 2]
    assert kind_ids.tolist() == [0] * 5000 + [1, 2]
    small = kinds_and_sizes(arrays[:5000], Numbering())[1]
    assert small.dtype == np.uint32
    widened = _with_size(small, 3, 1 << 33)
    assert widened.dtype == np.int64
    assert widened[3] == 1 << 33
    assert widened[4] == 12
    assert _with_size(small, 3, 7) is small
    assert small[3] == 7

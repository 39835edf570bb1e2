"""Batched ranged reads (``FileReader.read_ranges``): the same bytes as one read per range, on
local disk and through fsspec (``memory://``); the coalescing plan they use remotely.
(S3, with requests counted: tests/test_object_store_hygiene.py.)"""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.storage import Storage, coalesce

_ranges = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 300)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(ranges=_ranges, gap=st.integers(0, 500), limit=st.integers(1, 2000))
def test_coalesce_covers_each_range_once_within_the_limits(
    ranges: list[tuple[int, int]], gap: int, limit: int
) -> None:
    groups = coalesce(ranges, gap=gap, limit=limit)
    members = sorted(i for _, _, m in groups for i in m)
    assert members == list(range(len(ranges)))  # every range in exactly one request
    for start, end, m in groups:
        for i in m:  # ... which holds it
            offset, length = ranges[i]
            assert start <= offset
            assert offset + length <= end
        # over the limit only as one range's span (with ranges inside it: no extra bytes)
        spans = {(ranges[i][0], ranges[i][0] + ranges[i][1]) for i in m}
        assert end - start <= limit or (start, end) in spans
    starts = [start for start, _, _ in groups]
    assert starts == sorted(starts)
    merged = coalesce(ranges, gap=gap, limit=10**9)
    for (_, end, _), (start, _, _) in itertools.pairwise(merged):
        assert start - end > gap  # without a limit, anything closer was merged


@pytest.fixture(params=["local", "memory"], scope="module")
def blob(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Storage, str, bytes]:
    tmp_path = tmp_path_factory.mktemp("ranges")
    data = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    url = str(tmp_path / "blob") if request.param == "local" else f"memory://{uuid.uuid4().hex}/b"
    storage, path = Storage.from_url(url)
    storage.makedirs(path.rsplit("/", 1)[0])
    storage.write_bytes(path, data)
    return storage, path, data


@settings(max_examples=50, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 19000), st.integers(0, 1000)), max_size=20))
def test_read_ranges_equal_one_read_each(
    blob: tuple[Storage, str, bytes], ranges: list[tuple[int, int]]
) -> None:
    storage, path, data = blob
    reader = storage.open_reader(path)
    try:
        assert [bytes(v) for v in reader.read_ranges(ranges)] == [
            data[o : o + n] for o, n in ranges
        ]
        buffers = [np.empty(n, np.uint8) for _, n in ranges]
        reader.read_ranges_into([(o, b) for (o, _), b in zip(ranges, buffers, strict=True)])
        assert [b.tobytes() for b in buffers] == [data[o : o + n] for o, n in ranges]
    finally:
        reader.close()


def test_read_ranges_past_the_end_name_the_file(blob: tuple[Storage, str, bytes]) -> None:
    storage, path, data = blob
    reader = storage.open_reader(path)
    try:
        with pytest.raises(anyckpt.CorruptCheckpointError, match="past the end") as info:
            reader.read_ranges([(0, 10), (len(data) - 3, 4)])
        assert path in str(info.value)
    finally:
        reader.close()

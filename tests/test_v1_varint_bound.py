"""A V1 slice whose shape declares far more varint-coded elements (int32/int64/bool) than its
bytes can hold is refused before anything is allocated (found while fuzzing for issue 13: one
byte of data with a declared shape of 2^27 allocated 1 GiB; 2^45 leaked NumPy's MemoryError)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anyckpt.codecs import DecodeError
from anyckpt.codecs.v1 import decode_varints


@pytest.mark.parametrize("count", [2, 1 << 27, 1 << 45])
def test_more_values_than_bytes_is_refused_before_allocating(count: int) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="cannot hold"):
            decode_varints(b"\x01", count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 16


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=50))
def test_varints_round_trip(values: list[int]) -> None:
    data = bytearray()
    for v in values:
        while True:
            data.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                break
    assert decode_varints(bytes(data), len(values)).tolist() == values
    assert decode_varints(bytes(data), len(values)).dtype == np.uint64

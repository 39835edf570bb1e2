"""crc32c_rows: many short strings' CRC-32C at once in NumPy, the same as the C function."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.codecs.crc import crc32c, crc32c_rows, mask, mask_many

ROWS = st.lists(st.binary(max_size=80), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_rows_back_to_back_match_crc32c(rows: list[bytes]) -> None:
    data = np.frombuffer(b"".join(rows), dtype=np.uint8)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    got = crc32c_rows(data, lengths)
    assert got.dtype == np.uint32
    assert got.tolist() == [crc32c(r) for r in rows]
    # Masked as TensorFlow stores it: the same as masking the C function's CRC.
    assert mask_many(got).tolist() == [mask(crc32c(r)) for r in rows]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 30), st.integers(0, 70), st.randoms(use_true_random=False))
def test_matrix_rows_match_crc32c(rows: int, width: int, rnd: object) -> None:
    matrix = np.array(
        [[rnd.randrange(256) for _ in range(width)] for _ in range(rows)],  # type: ignore[attr-defined]
        dtype=np.uint8,
    ).reshape(rows, width)
    assert crc32c_rows(matrix).tolist() == [crc32c(row.tobytes()) for row in matrix]


def test_equal_lengths_and_longer_than_the_padding_table() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 4096 * 16, dtype=np.uint8)
    lengths = np.full(4096, 16)
    expected = [crc32c(data[i * 16 : i * 16 + 16].tobytes()) for i in range(4096)]
    assert crc32c_rows(data, lengths).tolist() == expected
    rows = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in (0, 1, 65, 100, 3)]
    joined = np.frombuffer(b"".join(rows), dtype=np.uint8)
    got = crc32c_rows(joined, np.array([len(r) for r in rows]))
    assert got.tolist() == [crc32c(r) for r in rows]


def test_no_rows() -> None:
    assert crc32c_rows(np.zeros(0, np.uint8), np.zeros(0, np.int64)).tolist() == []
    assert crc32c_rows(np.zeros(3, np.uint8), np.zeros(3, np.int64)).tolist() == [0, 0, 0]

"""CRC-32C (Castagnoli) and LevelDB's masking, as TensorFlow stores them.

The CRC itself runs in the ``crc32c`` C extension (hardware instructions where available); it
accepts any buffer and releases the GIL for large ones, so checksumming overlaps with I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import crc32c as _crc32c
import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Buffer

_MASK_DELTA = 0xA282EAD8


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``value`` (the CRC of what came before)."""
    return int(_crc32c.crc32c(data, value))


def mask(crc: int) -> int:
    """LevelDB's masked CRC: rotate right by 15 and add a constant (mod 2**32)."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def mask_many(crcs: np.ndarray) -> np.ndarray:
    """:func:`mask` of many CRCs at once (a uint32 array of the masked values)."""
    c = np.asarray(crcs).astype(np.uint32)
    masked: np.ndarray = ((c >> np.uint32(15)) | (c << np.uint32(17))) + np.uint32(_MASK_DELTA)
    return masked


#: CRCs masked per pass of :func:`mask_in_place` (bounds its temporaries).
_MASK_CHUNK = 1 << 16


def mask_in_place(crcs: np.ndarray, skip: np.ndarray | None = None) -> None:
    """:func:`mask` each of ``crcs`` (uint32) in place, but those where ``skip`` is True:
    a chunk at a time, so no array of the whole length is made."""
    for first in range(0, len(crcs), _MASK_CHUNK):
        part = crcs[first : first + _MASK_CHUNK]
        masked = mask_many(part)
        if skip is None:
            part[:] = masked
        else:
            np.copyto(part, masked, where=~skip[first : first + _MASK_CHUNK])


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def masked_crc32c(data: Buffer) -> int:
    """``mask(crc32c(data))``: the value TensorFlow writes in block trailers and bundle entries."""
    return mask(crc32c(data))


#: CRC-32C's reflected polynomial.
_POLY = 0x82F63B78


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> np.uint32(1)) ^ np.uint32(_POLY), table >> 1)
    return table.astype(np.uint32)


_TABLE = _byte_table()
#: Which table entry has each top byte (a CRC table's top bytes are a permutation).
_BY_TOP = np.argsort(_TABLE >> np.uint32(24)).tolist()
_TABLE_LIST = _TABLE.tolist()


def _undo_zero_byte(state: int) -> int:
    """The register that one zero byte takes to ``state`` (the step ``c -> T[c & 0xFF] ^
    (c >> 8)`` is invertible: ``c >> 8`` has a zero top byte, so ``T[c & 0xFF]`` is the
    entry with ``state``'s top byte)."""
    low = int(_BY_TOP[state >> 24])
    return (((state ^ int(_TABLE_LIST[low])) << 8) | low) & 0xFFFFFFFF


def _starts_for_padding(most: int) -> np.ndarray:
    """For k = 0..most, the register that k leading zero bytes take to CRC-32C's initial one:
    a row padded on the left with k zeros and started there has the CRC of the row alone."""
    states = [0xFFFFFFFF]
    for _ in range(most):
        states.append(_undo_zero_byte(states[-1]))
    return np.array(states, dtype=np.uint32)


_PAD_STARTS: np.ndarray = _starts_for_padding(64)


def crc32c_rows(data: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """The CRC-32C (unmasked) of each of many short byte strings at once, in NumPy.

    ``data`` is uint8: either a (rows, width) matrix, each row one string (``lengths`` None),
    or the strings back to back (1-D) with ``lengths`` giving each one's size. The work runs
    column by column across all rows with a byte table (one gather per byte of the longest
    string), so it is meant for many strings of a few dozen bytes: each is checksummed without
    a Python call or a buffer export per string. Strings of different lengths are placed
    right-aligned in a zero-padded matrix and each row starts from the register that its
    padding takes to the usual initial value, so the padding changes nothing."""
    data = np.asarray(data, dtype=np.uint8)
    if lengths is None:
        matrix = data
        rows, width = matrix.shape
        state = np.full(rows, 0xFFFFFFFF, dtype=np.uint32)
    else:
        lengths = np.asarray(lengths, dtype=np.int64)
        rows = len(lengths)
        width = int(lengths.max(initial=0))
        if rows and bool((lengths == width).all()):
            matrix = data[: rows * width].reshape(rows, width)
            state = np.full(rows, 0xFFFFFFFF, dtype=np.uint32)
        else:
            pad = width - lengths
            ends = np.cumsum(lengths)
            # Row r's byte j is data[end_r - width + j], zero where j < pad_r.
            index = (ends - width)[:, None] + np.arange(width, dtype=np.int64)
            padded = np.arange(width, dtype=np.int64) < pad[:, None]
            index[padded] = 0
            matrix = data[index] if len(data) else np.zeros((rows, width), np.uint8)
            matrix[padded] = 0
            if width <= len(_PAD_STARTS) - 1:
                state = _PAD_STARTS[pad]
            else:
                state = _starts_for_padding(width)[pad]
    table = _TABLE
    low = np.uint32(0xFF)
    eight = np.uint32(8)
    crc: np.ndarray = state.copy()
    scratch = np.empty(rows, dtype=np.uint32)
    for j in range(width):
        np.bitwise_xor(crc, matrix[:, j], out=scratch)
        scratch &= low
        crc >>= eight
        crc ^= table[scratch]
    crc ^= np.uint32(0xFFFFFFFF)
    return crc

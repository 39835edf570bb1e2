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


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def masked_crc32c(data: Buffer) -> int:
    """``mask(crc32c(data))``: the value TensorFlow writes in block trailers and bundle entries."""
    return mask(crc32c(data))

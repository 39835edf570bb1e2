"""TensorFlow DataType numbers <-> NumPy dtypes, and the on-disk byte order (always little-endian).

bfloat16 and the float8/int4 family come from ``ml_dtypes``; strings are NumPy object arrays of
``bytes``. TensorFlow stores numeric tensors as their raw little-endian element bytes, C order,
bool as one byte per element.
"""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

from ..errors import UnsupportedFormatError

DT_STRING = 7

#: The most bytes a NumPy array may span (``intp``), zero-length dimensions left out.
_MAX_ARRAY_BYTES = sys.maxsize


def numpy_can_shape(shape: tuple[int, ...], itemsize: int = 16) -> bool:
    """Whether NumPy can make an array of ``shape`` with elements of ``itemsize`` bytes (the
    largest, complex128, by default). NumPy refuses ("array is too big") a shape whose
    non-zero dimensions multiply past its maximum even when another dimension is zero and the
    array empty, as ``[0, 2**62, 2**62]``; TensorFlow's TensorShape accepts that shape."""
    total = max(itemsize, 1)
    for dim in shape:
        if dim:
            total *= dim
            if total > _MAX_ARRAY_BYTES:
                return False
    return True


#: DataType enum value -> NumPy dtype (native byte order). Strings are handled separately.
BY_ENUM: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int8),
    8: np.dtype(np.complex64),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    14: np.dtype(ml_dtypes.bfloat16),
    17: np.dtype(np.uint16),
    18: np.dtype(np.complex128),
    19: np.dtype(np.float16),
    22: np.dtype(np.uint32),
    23: np.dtype(np.uint64),
    24: np.dtype(ml_dtypes.float8_e5m2),
    25: np.dtype(ml_dtypes.float8_e4m3fn),
    26: np.dtype(ml_dtypes.float8_e4m3fnuz),
    27: np.dtype(ml_dtypes.float8_e4m3b11fnuz),
    28: np.dtype(ml_dtypes.float8_e5m2fnuz),
    29: np.dtype(ml_dtypes.int4),
    30: np.dtype(ml_dtypes.uint4),
}
_BY_DTYPE: dict[np.dtype, int] = {dt: enum for enum, dt in BY_ENUM.items()}
#: The numeric dtypes TensorFlow can store, in native byte order (a fast membership test).
NUMERIC_DTYPES: frozenset[np.dtype] = frozenset(_BY_DTYPE)

#: TensorFlow's names, for messages and the CLI.
_TF_NAMES: dict[int, str] = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    7: "string",
    8: "complex64",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    18: "complex128",
    19: "float16",
    22: "uint32",
    23: "uint64",
    24: "float8_e5m2",
    25: "float8_e4m3fn",
    26: "float8_e4m3fnuz",
    27: "float8_e4m3b11fnuz",
    28: "float8_e5m2fnuz",
    29: "int4",
    30: "uint4",
}

STRING_DTYPE = np.dtype(object)
LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def dtype_from_enum(enum: int, *, path: str | None = None) -> np.dtype:
    """The NumPy dtype for a TensorFlow DataType number (object dtype for DT_STRING)."""
    if enum == DT_STRING:
        return STRING_DTYPE
    try:
        return BY_ENUM[enum]
    except KeyError:
        raise UnsupportedFormatError(
            f"unsupported TensorFlow dtype number {enum}", path=path
        ) from None


def enum_from_dtype(dtype: np.dtype) -> int:
    """The TensorFlow DataType number for a NumPy dtype; raises TypeError if it has none."""
    if dtype == STRING_DTYPE or dtype.kind in "SU":
        return DT_STRING
    native = dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype
    try:
        return _BY_DTYPE[native]
    except KeyError:
        raise TypeError(f"dtype {dtype} has no TensorFlow equivalent") from None


def tf_name(enum: int) -> str:
    """TensorFlow's name for a dtype number (``float32``, ``bfloat16``, ``string``...)."""
    return _TF_NAMES.get(enum, f"dtype#{enum}")


def dtype_name(dtype: np.dtype) -> str:
    """TensorFlow's name for a NumPy dtype."""
    return tf_name(enum_from_dtype(dtype))


def to_little_endian(array: np.ndarray) -> np.ndarray:
    """``array`` as C-contiguous little-endian data; no copy when it already is."""
    dtype = array.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not LITTLE_ENDIAN_HOST):
        array = array.astype(dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def disk_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype to view on-disk bytes as (explicit little-endian where byte order matters)."""
    return dtype.newbyteorder("<") if dtype.itemsize > 1 and dtype.byteorder == "=" else dtype

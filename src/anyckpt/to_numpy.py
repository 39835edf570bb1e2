"""Any array-like value (NumPy, PyTorch, JAX arrays, scalars, strings) as a plain NumPy array
TensorFlow can store: the conversion under :func:`anyckpt.tensors.as_tensor`, kept below both
`tensors` and `partitioned` (which converts its pieces with it)."""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np

from .codecs.dtypes import NUMERIC_DTYPES, STRING_DTYPE, enum_from_dtype


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"string tensors hold bytes or str, not {type(value).__name__}")


#: PyTorch dtypes NumPy has no type for: the integer type of the same width their bits are
#: read as, and the ``ml_dtypes`` type they are then viewed as (TensorFlow has each).
_TORCH_BITS: dict[str, tuple[str, np.dtype]] = {
    "bfloat16": ("int16", np.dtype(ml_dtypes.bfloat16)),
    "float8_e4m3fn": ("uint8", np.dtype(ml_dtypes.float8_e4m3fn)),
    "float8_e5m2": ("uint8", np.dtype(ml_dtypes.float8_e5m2)),
    "float8_e4m3fnuz": ("uint8", np.dtype(ml_dtypes.float8_e4m3fnuz)),
    "float8_e5m2fnuz": ("uint8", np.dtype(ml_dtypes.float8_e5m2fnuz)),
}


def _from_torch(torch: Any, tensor: Any) -> np.ndarray:
    """A PyTorch tensor as a NumPy array, sharing its memory when it is on the CPU: detached
    from autograd (what is saved is the value), copied to the CPU from another device, and
    bfloat16 or float8 read through their bits (an integer view of the same width, viewed as
    ``ml_dtypes``' type: no copy)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.resolve_conj().resolve_neg()  # lazy conjugation/negation, made real
    bits = _TORCH_BITS.get(str(tensor.dtype).removeprefix("torch."))
    if bits is not None:
        return tensor.view(getattr(torch, bits[0])).numpy().view(bits[1])  # type: ignore[no-any-return]
    try:
        return tensor.numpy()  # type: ignore[no-any-return]
    except TypeError:  # complex32, bits types...: "Got unsupported ScalarType ComplexHalf"
        raise TypeError(f"dtype {tensor.dtype} has no TensorFlow equivalent") from None


def to_numpy(value: Any) -> np.ndarray:
    """``value`` as a NumPy array anyckpt can store (see :func:`anyckpt.tensors.as_tensor`,
    which is this plus keeping a :class:`~anyckpt.partitioned.Partitioned`'s partitions)."""
    if type(value) is np.ndarray and value.dtype in NUMERIC_DTYPES:
        return value  # the common case, checked first: a plain numeric array
    torch = sys.modules.get("torch")  # (never imported here: a tensor of it was made already)
    if torch is not None and isinstance(value, torch.Tensor):
        value = _from_torch(torch, value)
    array = np.asarray(value)
    if array.dtype.kind in "US" and not isinstance(value, np.ndarray):
        # NumPy's fixed-width S/U types drop trailing NULs (b"a\0" -> b"a"): keep the
        # caller's own str/bytes objects instead.
        array = np.asarray(value, dtype=object)
    if array.dtype.kind in "OUS":
        items = array.reshape(-1).tolist()
        kinds = set(map(type, items))
        if kinds <= {bytes}:
            values = items
        elif kinds <= {str}:
            values = [item.encode("utf-8") for item in items]
        else:
            values = list(map(_as_bytes, items))
        out = np.empty(len(values), dtype=STRING_DTYPE)
        out[:] = values  # bytes are not sequences to NumPy: one object per element
        return out.reshape(array.shape)
    enum_from_dtype(array.dtype)  # raises TypeError if unsupported
    return array

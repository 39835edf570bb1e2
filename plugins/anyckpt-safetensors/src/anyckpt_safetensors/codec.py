"""The safetensors layout, sans-I/O: header planning, encoding, parsing and validation.

A file is ``u64 LE n`` + ``n`` bytes of JSON header + the data buffer. The header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the buffer),
plus an optional ``"__metadata__"`` of string to string. As the reference implementation
writes it: compact JSON, tensors ordered by dtype (widest first) then name, data in that order
with no gaps, and the header padded with spaces so that the buffer starts 8-byte aligned.

The rules checked on reading are the reference's: the header is at most 100 MB and fits the
file, is a JSON object starting with ``{``, every entry is well formed and its byte size matches
dtype and shape, and the entries tile the buffer exactly (no gap, overlap or trailing bytes).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"
_U64 = struct.Struct("<Q")

#: safetensors dtype codes, in the reference's enum order (the sort order of the layout).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "C64": np.dtype(np.complex64),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}
_RANK = {code: i for i, code in enumerate(DTYPES)}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class HeaderError(ValueError):
    """A header that breaks the format's rules (the caller adds the file name)."""


@dataclass(frozen=True, slots=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed header: entries in the header's order, the metadata, and where the buffer
    starts."""

    entries: dict[str, Entry]
    metadata: dict[str, str] | None
    data_start: int


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code of a NumPy dtype; ValueError if safetensors has none."""
    native = dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype
    try:
        return _CODES[native]
    except KeyError:
        raise ValueError(
            f"safetensors has no dtype for {dtype} (it holds {', '.join(DTYPES)})"
        ) from None


def encode_header(
    tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[str]]:
    """The file's first bytes (length + padded JSON), and the order to write the data in."""
    codes = {name: dtype_code(dtype) for name, (dtype, _) in tensors.items()}
    order = sorted(tensors, key=lambda n: (-_RANK[codes[n]], n.encode("utf-8")))
    header: dict[str, Any] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError("safetensors metadata maps str to str")
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name in order:
        if name == METADATA_KEY:
            raise ValueError(f"{METADATA_KEY!r} is reserved in safetensors")
        dtype, shape = tensors[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": codes[name],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return _U64.pack(len(text)) + text, order


def header_length(first8: bytes, file_size: int) -> int:
    """The JSON header's length from the first 8 bytes, checked against the file size."""
    if len(first8) < 8:
        raise HeaderError(f"file too short for a safetensors header ({file_size} bytes)")
    (n,) = _U64.unpack_from(first8)
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"header of {n} bytes is larger than the {MAX_HEADER_SIZE} allowed")
    if 8 + n > file_size:
        raise HeaderError(f"header of {n} bytes runs past the end of the file ({file_size} bytes)")
    return int(n)


def _no_duplicates(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HeaderError(f"{what} must be a non-negative integer, not {value!r}")
    return value


def _compact(
    pairs: list[tuple[str, Any]], shapes: dict[tuple[int, ...], tuple[int, ...]]
) -> Entry | None:
    """A well-formed tensor entry as an :class:`Entry` (equal shapes shared through
    ``shapes``), else None (checked again, by name)."""
    info = dict(pairs)
    if len(info) != 3 or info.keys() != {"dtype", "shape", "data_offsets"}:
        return None
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return None
    if not isinstance(shape, list) or len(shape) > 1024 or not all(map(_natural, shape)):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_natural, offsets)):
        return None
    dims = tuple(shape)
    return Entry(dtype, shapes.setdefault(dims, dims), offsets[0], offsets[1])


def _natural(value: Any) -> bool:
    return type(value) is int and value >= 0


def _object(pairs: list[tuple[str, Any]], shapes: dict[tuple[int, ...], tuple[int, ...]]) -> Any:
    """Each JSON object as it is parsed: a tensor entry becomes a compact :class:`Entry` at once
    (no dict per entry held), anything else a dict with its duplicate keys refused."""
    if len(pairs) == 3:
        entry = _compact(pairs, shapes)
        if entry is not None:
            return entry
    return _no_duplicates(pairs)


def decode_header(text: bytes, file_size: int) -> Header:
    """Parse and validate the JSON header (``text`` without its 8-byte length). Entries are
    made compact while parsing; their number is bounded by the header's bytes (zero-size ones)
    and by the buffer, which they must tile exactly."""
    if not text.startswith(b"{"):
        raise HeaderError("the header does not start with '{'")
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    try:
        raw = json.loads(
            text.decode("utf-8"), object_pairs_hook=lambda pairs: _object(pairs, shapes)
        )
    except HeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"the header is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise HeaderError("the header is not a JSON object")
    metadata = raw.pop(METADATA_KEY, None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    entries: dict[str, Entry] = raw
    for name, info in raw.items():
        if not isinstance(info, Entry):
            _refuse(name, info)
        if info.end < info.begin or info.end - info.begin != (
            math.prod(info.shape) * DTYPES[info.dtype].itemsize
        ):
            raise HeaderError(
                f"entry {name!r}: offsets [{info.begin}, {info.end}] do not hold "
                f"{info.dtype}{list(info.shape)}"
            )
    data_start = len(text) + 8
    buffer = file_size - data_start
    at = 0
    for name in sorted(entries, key=lambda n: (entries[n].begin, entries[n].end)):
        entry = entries[name]
        if entry.begin != at:
            raise HeaderError(
                f"entry {name!r} starts at {entry.begin}, the previous one ends at {at}"
            )
        at = entry.end
    if at != buffer:
        raise HeaderError(f"the entries cover {at} bytes, the buffer has {buffer}")
    return Header(entries, metadata, data_start)


def _refuse(name: str, info: Any) -> None:
    """Raise the HeaderError that says why ``info`` is not a well-formed entry."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise HeaderError(f"entry {name!r}: unknown dtype {dtype!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or len(shape) > 1024:
        raise HeaderError(f"entry {name!r}: shape must be a list of integers")
    for d in shape:
        _int(d, f"a dimension of {name!r}")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise HeaderError(f"entry {name!r}: data_offsets must be [begin, end]")
    for o in offsets:
        _int(o, f"an offset of {name!r}")
    raise HeaderError(f"entry {name!r} is malformed")

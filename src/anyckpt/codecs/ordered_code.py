"""OrderedCode, as TensorFlow uses it to name tensor slices (``EncodeTensorNameSlice``).

A slice key is ``num(0) string(name) num(rank) (signed(start) signed(length))*``, where
``num`` is a length-prefixed big-endian unsigned number, ``string`` escapes 0x00 as ``00 ff`` and
0xff as ``ff 00`` and ends with ``00 01``, and ``signed`` is the order-preserving signed varint of
``tensorflow/core/lib/strings/ordered_code.cc`` (a length of -1 means "the whole dimension").
V1 checkpoints key every saved slice this way; V2 bundles key the slices of partitioned variables.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from . import DecodeError

Extent = tuple[int, int]  # (start, length); length -1 = the full dimension


def write_num_increasing(value: int) -> bytes:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"unsigned number out of range: {value}")
    body = value.to_bytes(8, "big").lstrip(b"\0")
    return bytes([len(body)]) + body


def read_num_increasing(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise DecodeError("truncated ordered-code number")
    n = data[pos]
    if n > 8 or pos + 1 + n > len(data):
        raise DecodeError("bad ordered-code number")
    return int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def write_string(value: bytes) -> bytes:
    # Escape both bytes in one pass: chained replaces would re-escape the 00 of `ff 00`.
    parts = (part.replace(b"\xff", b"\xff\x00") for part in value.split(b"\x00"))
    return b"\x00\xff".join(parts) + b"\x00\x01"


def read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    out = bytearray()
    n = len(data)
    while pos < n:
        byte = data[pos]
        if byte not in (0x00, 0xFF):
            out.append(byte)
            pos += 1
            continue
        if pos + 1 >= n:
            break
        nxt = data[pos + 1]
        if byte == 0x00 and nxt == 0x01:
            return bytes(out), pos + 2
        if byte == 0x00 and nxt == 0xFF:
            out.append(0x00)
        elif byte == 0xFF and nxt == 0x00:
            out.append(0xFF)
        else:
            raise DecodeError("bad escape in ordered-code string")
        pos += 2
    raise DecodeError("unterminated ordered-code string")


def _signed_length(value: int) -> int:
    x = ~value if value < 0 else value
    return x.bit_length() // 7 + 1


def write_signed_num_increasing(value: int) -> bytes:
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"signed number out of range: {value}")
    length = _signed_length(value)
    bits = 7 * length
    raw = value & ((1 << bits) - 1)
    if value >= 0:
        raw |= ((1 << length) - 1) << bits
    return raw.to_bytes(length, "big")


def read_signed_num_increasing(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise DecodeError("truncated ordered-code signed number")
    negative = not data[pos] & 0x80
    # The header is `length` copies of the sign's complement bit; count them over two bytes.
    head = int.from_bytes(data[pos : pos + 2].ljust(2, b"\0" if not negative else b"\xff"), "big")
    if negative:
        head ^= 0xFFFF
    length = 0
    while length < 16 and head & (0x8000 >> length):
        length += 1
    if not 1 <= length <= 10 or pos + length > len(data):
        raise DecodeError("bad ordered-code signed number")
    raw = int.from_bytes(data[pos : pos + length], "big")
    bits = 7 * length
    value = raw & ((1 << bits) - 1)
    if negative:
        value -= 1 << bits
    if not -(1 << 63) <= value < 1 << 63 or _signed_length(value) != length:
        raise DecodeError("non-canonical ordered-code signed number")
    return value, pos + length


def encode_tensor_name_slice(name: bytes, extents: Sequence[Extent]) -> bytes:
    """TensorFlow's ``EncodeTensorNameSlice``: the table key of one slice of a tensor."""
    parts = [_slice_key_head(name, len(extents))]
    for start, length in extents:
        parts.append(_signed(start))
        parts.append(_signed(length))
    return b"".join(parts)


@functools.lru_cache(maxsize=4096)
def _slice_key_head(name: bytes, rank: int) -> bytes:
    """The part of a slice key before its extents (a tensor's pieces all share it)."""
    return write_num_increasing(0) + write_string(name) + write_num_increasing(rank)


#: Extents repeat (every piece of a row split has the same column extent): cached encodings.
_signed = functools.lru_cache(maxsize=1 << 16)(write_signed_num_increasing)


def decode_tensor_name_slice(key: bytes) -> tuple[bytes, tuple[Extent, ...]]:
    """Inverse of :func:`encode_tensor_name_slice`."""
    zero, pos = read_num_increasing(key, 0)
    if zero != 0:
        raise DecodeError("slice key does not start with 0")
    name, pos = read_string(key, pos)
    rank, pos = read_num_increasing(key, pos)
    if rank > 64:
        raise DecodeError(f"slice key rank {rank} is absurd")
    extents = []
    for _ in range(rank):
        start, pos = read_signed_num_increasing(key, pos)
        length, pos = read_signed_num_increasing(key, pos)
        extents.append((start, length))
    if pos != len(key):
        raise DecodeError("trailing bytes after slice key")
    return name, tuple(extents)

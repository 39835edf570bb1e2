"""Protocol-buffer varints (unsigned LEB128), as LevelDB tables and string tensors use them."""

from __future__ import annotations

from . import DecodeError


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer below 2**64."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int, limit: int | None = None) -> tuple[int, int]:
    """Decode one varint64 at ``pos``; return (value, position after it).

    ``limit`` (default: the end of ``data``) bounds the read; running past it, or a varint
    longer than 10 bytes, raises :class:`DecodeError`.
    """
    end = len(data) if limit is None else limit
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >= 1 << 64:
                raise DecodeError("varint overflows 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")

"""The protocol-buffer wire format, one field at a time: for reading a large message (a
``.meta`` graph) without building it whole. Sans-I/O; bounds-checked against the buffer.

:func:`fields` accepts what protobuf's parser accepts on the wire (every wire type, groups
included, skipped), and raises :class:`~anyckpt.codecs.DecodeError` where it would fail:
a truncated or over-long varint, a length past the end, field number 0, an unmatched group.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import DecodeError
from .varint import decode_varint

VARINT, FIXED64, LENGTH_DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5

#: Nesting of groups protobuf's parser accepts (its recursion limit).
MAX_GROUP_DEPTH = 100


def fields(
    data: bytes | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int, int]]:
    """Each field of the message in ``data[start:end]``, in wire order, as ``(number, wire
    type, a, b)``: for a varint, ``a`` is its value; otherwise ``data[a:b]`` holds the value
    (for a group, its body)."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        key, pos = decode_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number >= 1 << 29:
            raise DecodeError(f"bad field number {number}")
        if wire == VARINT:
            value, pos = decode_varint(data, pos, end)
            yield number, wire, value, pos
        elif wire == LENGTH_DELIMITED:
            size, pos = decode_varint(data, pos, end)
            if size > end - pos:
                raise DecodeError("length-delimited field runs past its message")
            yield number, wire, pos, pos + size
            pos += size
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if size > end - pos:
                raise DecodeError("fixed-width field runs past its message")
            yield number, wire, pos, pos + size
            pos += size
        elif wire == START_GROUP:
            body = pos
            pos = _skip_group(data, number, pos, end)
            yield number, wire, body, pos
        else:  # END_GROUP outside a group, or wire types 6 and 7
            raise DecodeError(f"bad wire type {wire} for field {number}")


def _skip_group(data: bytes | memoryview, number: int, pos: int, end: int) -> int:
    """The position after the END_GROUP matching a group ``number`` whose body starts at
    ``pos`` (iterative: nesting costs no Python stack)."""
    open_groups = [number]
    while open_groups:
        if pos >= end:
            raise DecodeError("unterminated group")
        key, pos = decode_varint(data, pos, end)
        inner, wire = key >> 3, key & 7
        if inner == 0:
            raise DecodeError("bad field number 0")
        if wire == VARINT:
            _, pos = decode_varint(data, pos, end)
        elif wire == LENGTH_DELIMITED:
            size, pos = decode_varint(data, pos, end)
            if size > end - pos:
                raise DecodeError("length-delimited field runs past its message")
            pos += size
        elif wire in (FIXED64, FIXED32):
            pos += 8 if wire == FIXED64 else 4
            if pos > end:
                raise DecodeError("fixed-width field runs past its message")
        elif wire == START_GROUP:
            if len(open_groups) >= MAX_GROUP_DEPTH:
                raise DecodeError("groups nested too deeply")
            open_groups.append(inner)
        elif wire == END_GROUP:
            if open_groups.pop() != inner:
                raise DecodeError("group ends with another field number")
        else:
            raise DecodeError(f"bad wire type {wire}")
    return pos


def last_string(data: bytes | memoryview, start: int, end: int, number: int) -> bytes | None:
    """The last value of the length-delimited field ``number`` of the message
    ``data[start:end]`` (proto3: the last one wins), or None."""
    found: bytes | None = None
    for field, wire, a, b in fields(data, start, end):
        if field == number and wire == LENGTH_DELIMITED:
            found = bytes(data[a:b])
    return found

"""The columnar header parse (issue 13, item 7) against the ``json.loads`` one: for random
headers, written compact as the reference writer does or in any other JSON spelling, both give
the same entries and metadata; for damaged ones both refuse (``HeaderError``, which the reader
turns into ``CorruptCheckpointError`` naming the file), never another exception."""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from anyckpt_safetensors import codec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyckpt
import anyckpt.sync

NAMES = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\\x00\x1f/\u00e9\u4e2d\U0001f600 .'),
    max_size=6,
).filter(lambda n: n != codec.METADATA_KEY)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, int, bool]:
    """(header text as padded JSON, buffer size, whether it is spelled as the reference writer
    spells it: compact, keys in its order)."""
    names = draw(st.lists(NAMES, unique=True, max_size=12))
    items = []
    for name in names:
        code = draw(st.sampled_from(list(codec.DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        items.append((name, code, shape, math.prod(shape) * codec.DTYPES[code].itemsize))
    placed = draw(st.permutations(range(len(items))))  # the data's order, not the header's
    offsets: dict[int, tuple[int, int]] = {}
    at = 0
    for i in placed:
        offsets[i] = (at, at + items[i][3])
        at += items[i][3]
    canonical = draw(st.booleans())
    header: dict[str, Any] = {}
    metadata = draw(st.none() | st.dictionaries(NAMES, st.text(max_size=4), max_size=3))
    metadata_last = not canonical and draw(st.booleans())
    if metadata is not None and not metadata_last:
        header[codec.METADATA_KEY] = metadata
    for i, (name, code, shape, _) in enumerate(items):
        fields = [("dtype", code), ("shape", shape), ("data_offsets", list(offsets[i]))]
        if not canonical:
            fields = draw(st.permutations(fields))
        header[name] = dict(fields)
    if metadata is not None and metadata_last:
        header[codec.METADATA_KEY] = metadata
    if canonical:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(
            header,
            separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :\n")])),
            indent=draw(st.sampled_from([None, 0, 2, "\t"])),
            ensure_ascii=draw(st.booleans()),
        )
    raw = text.encode("utf-8")
    raw += b" " * draw(st.integers(0, 9))
    return raw, at, canonical


def reference(text: bytes, file_size: int) -> tuple[dict[str, codec.Entry], Any]:
    """What ``json.loads`` makes of a header, the rules checked as before the columns."""
    if not text.startswith(b"{"):
        raise codec.HeaderError("the header does not start with '{'")
    entries, metadata = codec._decode_json(text, file_size)
    for name, entry in entries.items():  # what the columns cannot hold is refused
        name.encode("utf-8")  # UnicodeEncodeError: "not valid Unicode"
        if any(d >= 1 << 63 for d in entry.shape):  # beside a zero dimension
            raise OverflowError("too large")
    return entries, metadata


def same_outcome(text: bytes, file_size: int) -> None:
    """decode_header and the reference agree: the same entries (listed in byte order) and
    metadata, or both refuse with HeaderError."""
    try:
        expected: Any = reference(text, file_size)
    except codec.HeaderError:
        expected = None
    except UnicodeEncodeError:
        expected = "not valid Unicode"
    except OverflowError:
        expected = "too large"
    scanned = codec._scan(text, file_size - 8 - len(text)) if text.startswith(b"{") else None
    if scanned is not None:  # the fast path never accepts what the reference refuses
        assert isinstance(expected, tuple)
        assert dict(scanned[0].items()) == expected[0]
    refused = None
    try:
        header = codec.decode_header(text, file_size)
    except codec.HeaderError as exc:
        refused = str(exc)
    if refused is not None:
        assert expected is None or (isinstance(expected, str) and expected in refused)
        return
    assert isinstance(expected, tuple)
    entries, metadata = expected
    assert dict(header.entries.items()) == entries
    assert list(header.entries) == sorted(entries, key=lambda n: n.encode("utf-8"))
    assert len(header.entries) == len(entries)
    assert header.metadata == metadata
    assert header.data_start == len(text) + 8


#: What a number or string of the header may be replaced by: each breaks a rule or not.
VALUES = [b"0", b"1", b"3", b"4", b"7", b"8", b"-1", b"1.0", b"1e3", b"true", b"null", b"[]"]
VALUES += [b"%d" % (1 << k) for k in (31, 32, 40, 63, 64, 70)]
VALUES += [b'"F32"', b'"U8"', b'"F99"', b'"raw"', b'"shuffle"', b'"strings"', b'"a"', b'""']


def damage(text: bytes, data: st.DataObject, syntax: bool) -> bytearray:
    """``text`` with 1-3 damages: a number or string replaced by another value (the JSON stays
    valid: the rules decide), or (``syntax``) also a byte set, inserted or deleted."""
    damaged = bytearray(text)
    for _ in range(data.draw(st.integers(1, 3))):
        tokens = [m.span() for m in re.finditer(rb'-?[0-9]+|"[^"\\]*"', damaged)]
        if tokens and (not syntax or data.draw(st.booleans())):
            a, b = data.draw(st.sampled_from(tokens))
            damaged[a:b] = data.draw(st.sampled_from(VALUES))
            continue
        at = data.draw(st.integers(0, max(len(damaged) - 1, 0)))
        how = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(b'{}[],:"\\0123456789 -.eE\x00\xff'))
        if how == "set" and damaged:
            damaged[at] = byte
        elif how == "insert":
            damaged.insert(at, byte)
        elif damaged:
            del damaged[at]
    return damaged


@settings(max_examples=300, deadline=None)
@given(case=headers())
def test_columns_give_the_entries_json_loads_gives(case: tuple[bytes, int, bool]) -> None:
    text, buffer, canonical = case
    same_outcome(text, 8 + len(text) + buffer)
    if canonical:  # the reference writer's spelling never takes the slow path
        assert codec._scan(text, buffer) is not None


@settings(max_examples=400, deadline=None)
@given(case=headers(), data=st.data(), syntax=st.booleans())
def test_damaged_headers_are_refused_as_json_loads_refuses_them(
    case: tuple[bytes, int, bool], data: st.DataObject, syntax: bool
) -> None:
    text, buffer, _ = case
    damaged = damage(text, data, syntax)
    extra = data.draw(st.sampled_from([0, 0, 1, -1, 4]))
    same_outcome(bytes(damaged), 8 + len(damaged) + max(buffer + extra, 0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=headers(), flip=st.integers(0, 1 << 16))
def test_a_damaged_file_is_a_corrupt_checkpoint_naming_it(
    case: tuple[bytes, int, bool], flip: int
) -> None:
    text, buffer, _ = case
    damaged = bytearray(text)
    damaged[flip % len(damaged)] ^= 0x5A
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.safetensors"
        path.write_bytes(struct.pack("<Q", len(damaged)) + damaged + b"\0" * buffer)
        message = None
        try:
            with anyckpt.sync.open(path, format="safetensors") as reader:
                reader.read_many()
        except anyckpt.CorruptCheckpointError as exc:  # nothing else (ValueError, KeyError...)
            message = str(exc)
        if message is not None:
            assert str(path) in message
            assert "\n" not in message


def test_escaped_unicode_and_duplicate_names() -> None:
    def text(body: str) -> bytes:
        return body.encode()

    one = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    body = '{"a\\"\\u00e9":' + one + "}"
    header = codec.decode_header(text(body), 8 + len(body) + 1)
    assert list(header.entries) == ['a"é']
    assert header.entries['a"é'] == codec.Entry("U8", (1,), 0, 1)
    body = '{"a":' + one + ',"a":' + one + "}"
    with pytest.raises(codec.HeaderError, match="duplicate key 'a'"):
        codec.decode_header(text(body), 8 + len(body) + 1)
    body = '{"\\ud800":' + one + "}"  # a lone surrogate: no UTF-8 name
    with pytest.raises(codec.HeaderError, match="not valid Unicode"):
        codec.decode_header(text(body), 8 + len(body) + 1)


def test_a_header_as_the_reference_writes_it_is_scanned_into_columns() -> None:
    """The reference implementation's own file (dtype order, then names) takes the fast path
    and comes back with its entries in byte order."""
    from safetensors.numpy import save

    tensors = {
        "b.weight": np.ones((2, 3), np.float32),
        "a.bias": np.arange(4, dtype=np.int64),
        "é": np.zeros((0, 5), np.float16),
        "c": np.zeros((), np.uint8),
    }
    data = save(tensors, metadata={"format": "np"})
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n]
    assert codec._scan(text, len(data) - 8 - n) is not None
    header = codec.decode_header(text, len(data))
    assert list(header.entries) == ["a.bias", "b.weight", "c", "é"]
    assert header.metadata == {"format": "np"}
    for name, array in tensors.items():
        entry = header.entries[name]
        assert entry.shape == array.shape
        assert codec.DTYPES[entry.dtype] == array.dtype
        assert entry.nbytes == array.nbytes


def entry(dtype: str = "U8", shape: str = "[2]", begin: int = 0, end: int = 2) -> str:
    return f'{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"a":' + entry() + "}", ""),  # the one accepted
        ('{"a":' + entry("X9") + "}", "unknown dtype 'X9'"),
        ('{"a":' + entry(shape="[" + ",".join(["1"] * 1025) + "]", end=1) + "}", "shape must"),
        ('{"a":' + entry(shape="[3]") + "}", r"do not hold U8\[3\]"),
        ('{"a":' + entry(begin=2, end=0) + "}", "do not hold"),
        ('{"a":' + entry(begin=1, end=3) + "}", "starts at 1"),
        ('{"a":' + entry(shape="[1]", end=1) + "}", "cover 1 bytes, the buffer has 2"),
        ('{"a":' + entry(shape="[1]", end=1) + ',"b":' + entry(shape="[2]") + "}", "starts at 0"),
        ('{"a":' + entry(shape="[1]", end=1) + ',"a":' + entry("U8", "[1]", 1) + "}", "duplicate"),
        ('{"__metadata__":{"k":"v","k":"w"},"a":' + entry() + "}", "duplicate key 'k'"),
        ('{"__metadata__":{"k":1},"a":' + entry() + "}", "__metadata__ must"),
        ('{"__metadata__":' + entry() + "}", "__metadata__ must"),
        ('{"a":' + entry() + "} x", "not valid JSON"),
        (
            '{"a":' + entry(shape="[0,99999999999999999999]", end=0) + ',"b":' + entry() + "}",
            "large",
        ),
        ('{"a":' + entry(shape="[2.0]") + "}", "non-negative integer, not 2.0"),
    ],
)
def test_each_rule_is_kept_by_the_columns(body: str, message: str) -> None:
    """A header as the reference writer spells it, breaking one rule: the scan leaves it to the
    reference parse, whose error is raised."""
    text = body.encode()
    size = 8 + len(text) + 2
    if not message:
        assert codec._scan(text, 2) is not None
        assert codec.decode_header(text, size).entries["a"] == codec.Entry("U8", (2,), 0, 2)
        return
    assert codec._scan(text, 2) is None
    with pytest.raises(codec.HeaderError, match=message):
        codec.decode_header(text, size)

"""The wire-format walker that reads a ``.meta`` graph one node at a time
(``anyckpt.codecs.protowire``): it accepts exactly what protobuf's own parser accepts, and
finds the same fields."""

from __future__ import annotations

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError as ProtobufDecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt._proto.node_def_pb2 import NodeDef
from anyckpt.codecs import DecodeError
from anyckpt.codecs.protowire import LENGTH_DELIMITED, fields, last_string
from anyckpt.codecs.varint import encode_varint


def _protobuf_accepts(data: bytes) -> bool:
    """Whether protobuf parses ``data`` (as a message whose every field is unknown)."""
    try:
        empty_pb2.Empty.FromString(data)
    except ProtobufDecodeError:
        return False
    return True


def _walker_accepts(data: bytes) -> bool:
    try:
        for _ in fields(data):
            pass
    except DecodeError:
        return False
    return True


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | wire) + payload


_wire_fields = st.one_of(
    st.builds(
        lambda n, v: _field(n, 0, encode_varint(v)), st.integers(1, 40), st.integers(0, 2**64 - 1)
    ),
    st.builds(
        lambda n, b: _field(n, 2, encode_varint(len(b)) + b),
        st.integers(1, 40),
        st.binary(max_size=20),
    ),
    st.builds(lambda n, b: _field(n, 1, b), st.integers(1, 40), st.binary(min_size=8, max_size=8)),
    st.builds(lambda n, b: _field(n, 5, b), st.integers(1, 40), st.binary(min_size=4, max_size=4)),
)
_messages = st.recursive(
    st.lists(_wire_fields, max_size=6).map(b"".join),
    lambda inner: st.builds(
        lambda n, body, rest: _field(n, 3, body) + encode_varint(n << 3 | 4) + rest,
        st.integers(1, 40),
        inner,
        inner,
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(_messages)
def test_well_formed_messages_are_walked_as_protobuf_reads_them(data: bytes) -> None:
    assert _protobuf_accepts(data)
    assert _walker_accepts(data)


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40),
        _messages.flatmap(lambda m: st.integers(0, len(m)).map(lambda cut: m[:cut])),
    )
)
def test_the_walker_refuses_exactly_what_protobuf_refuses(data: bytes) -> None:
    assert _walker_accepts(data) == _protobuf_accepts(data), data.hex()


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=10),
    st.text(max_size=10),
    st.lists(st.text(max_size=10), max_size=4),
)
def test_fields_of_a_node_are_the_ones_serialized(name: str, op: str, inputs: list[str]) -> None:
    node = NodeDef(name=name, op=op, input=inputs)
    data = node.SerializeToString()
    found = [(n, bytes(data[a:b])) for n, w, a, b in fields(data) if w == LENGTH_DELIMITED]
    expected = [(1, name.encode())] * bool(name) + [(2, op.encode())] * bool(op)
    expected += [(3, i.encode()) for i in inputs]
    assert found == expected
    assert last_string(data, 0, len(data), 2) == (op.encode() if op else None)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x08", "truncated varint"),
        (b"\x12\x05ab", "runs past"),
        (b"\x00\x00", "field number 0"),
        (b"\x0b\x08\x01", "unterminated group"),
        (b"\x0b\x14", "another field number"),
        (b"\x0c", "wire type 4"),
    ],
)
def test_malformed_wire_data_names_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        list(fields(data))

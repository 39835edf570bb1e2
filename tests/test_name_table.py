"""anyckpt.codecs.name_table: names as one blob and offsets, sorted and looked up without a
Python object per name; checked against Python's own sort of the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.codecs import name_table
from anyckpt.codecs.name_table import NameTable, byte_order, gather


def columns(names: list[bytes]) -> tuple[bytes, np.ndarray]:
    ends = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum([len(n) for n in names], out=ends[1:])
    return b"".join(names), ends


def pieces(blob: bytes, ends: np.ndarray) -> list[bytes]:
    return [blob[a:b] for a, b in zip(ends[:-1].tolist(), ends[1:].tolist(), strict=True)]


# Short alphabets with NUL in them: "a" / "a\0" / "a\0b", the cases zero padding must get right.
names_st = st.lists(
    st.binary(max_size=6).map(lambda b: bytes(x % 3 for x in b)), max_size=40
) | st.lists(
    st.sampled_from([b"", b"\0", b"a", b"a\0", b"a\0\0", b"a\0b", b"ab", b"b", b"\xff", b"\xff\0"]),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(names=names_st)
def test_byte_order_sorts_like_python_and_finds_duplicates(names: list[bytes]) -> None:
    blob, ends = columns(names)
    order, duplicated = byte_order(blob, ends)
    if order is None:
        assert names == sorted(set(names))  # already strictly increasing
        assert not duplicated
        return
    assert [names[i] for i in order.tolist()] == sorted(names)
    assert duplicated == (len(set(names)) < len(names))
    sorted_blob, sorted_ends = gather(blob, ends, order)
    assert pieces(sorted_blob, sorted_ends) == sorted(names)


@settings(max_examples=100, deadline=None)
@given(names=names_st)
def test_the_python_sort_for_very_long_names_agrees(names: list[bytes]) -> None:
    blob, ends = columns(names)
    expected = byte_order(blob, ends)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(name_table, "_PAD_BYTES", 0)  # every blob "too wide" to pad
        got = byte_order(blob, ends)
    assert got[1] == expected[1]
    ordered = got[0] if got[0] is not None else np.arange(len(names))
    assert [names[i] for i in ordered.tolist()] == sorted(names)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.sets(st.text(max_size=5), max_size=30),
    probes=st.lists(st.text(max_size=5), max_size=10),
)
def test_lookup_and_listing(texts: set[str], probes: list[str]) -> None:
    ordered = sorted(texts, key=lambda t: t.encode("utf-8", "surrogatepass"))
    if any("\ud800" <= c <= "\udfff" for t in ordered for c in t):
        return  # names of a table are UTF-8 (surrogateescape tested below)
    blob, ends = columns([t.encode() for t in ordered])
    table = NameTable(blob, ends)
    assert len(table) == len(ordered)
    assert table.names() == ordered
    assert table.names(1, 3) == ordered[1:3]
    for i, text in enumerate(ordered):
        assert table.position(text) == i
        assert table.name(i) == text
    for probe in probes:
        expected = ordered.index(probe) if probe in texts else None
        assert table.position(probe) == expected
    assert table.position(b"x") is None  # not a str


def test_surrogateescape_names_are_found_only_by_their_own_spelling() -> None:
    names = [b"a", b"\x80", b"\xc3\xa9"]  # \x80 is not UTF-8: "\udc80" under surrogateescape
    blob, ends = columns(names)
    table = NameTable(blob, ends, "surrogateescape")
    assert table.names() == ["a", "\udc80", "é"]
    assert table.position("\udc80") == 1
    assert table.position("é") == 2
    assert table.position("\udcc3\udca9") is None  # the same bytes, another name
    assert table.nbytes() == len(blob) + ends.nbytes

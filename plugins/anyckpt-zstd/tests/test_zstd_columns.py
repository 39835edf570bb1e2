"""The columnar header parse (issue 13, item 7) against the ``json.loads`` one: for random
headers, as :func:`codec.encode_header` writes them or in any other JSON spelling, both give the
same tensors and level; for damaged ones both refuse (``ContainerError``, which the reader turns
into ``CorruptCheckpointError`` naming the file), never another exception."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from anyckpt_zstd import codec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyckpt
import anyckpt.sync
from anyckpt.codecs.crc import crc32c
from anyckpt.codecs.dtypes import BY_ENUM, DT_STRING

NAMES = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\\x00\x1f/\u00e9\u4e2d\U0001f600 .'),
    max_size=6,
)
ENUMS = [*sorted(BY_ENUM), DT_STRING]


@st.composite
def tensor_infos(draw: st.DrawFn, offset: int) -> codec.TensorInfo:
    enum = draw(st.sampled_from(ENUMS))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    count = math.prod(shape)
    if enum == DT_STRING:
        layout, itemsize = "strings", 1
        raw = 8 * count + draw(st.integers(0, 9))
    else:
        itemsize = BY_ENUM[enum].itemsize
        layout = draw(st.sampled_from(["raw", "shuffle"]))
        raw = count * itemsize
    per = itemsize * draw(st.integers(1, 3))
    chunks = []
    at = 0
    while at < raw:
        n = min(per, raw - at)
        size = draw(st.integers(1, 5))
        chunks.append(codec.Chunk(offset, size, n, draw(st.integers(0, (1 << 32) - 1))))
        offset += size + draw(st.integers(0, 2))
        at += n
    partitions: tuple[tuple[tuple[int, int], ...], ...] = ()
    if shape and draw(st.booleans()):
        partitions = (tuple((0, d) for d in shape),)
    return codec.TensorInfo(enum, shape, layout, tuple(chunks), partitions)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, int, bool]:
    """(header bytes, where the data ends, whether it is spelled as encode_header spells it)."""
    names = draw(st.lists(NAMES, unique=True, max_size=10))
    tensors = {}
    end = 0
    for name in names:
        info = draw(tensor_infos(end))
        tensors[name] = info
        end = max([end, *(c.offset + c.size for c in info.chunks)])
    level = draw(st.integers(-5, 22))
    if draw(st.booleans()):
        return codec.encode_header(level, tensors), end, True
    body = json.loads(codec.encode_header(level, tensors))
    for name, entry in body["tensors"].items():
        body["tensors"][name] = dict(draw(st.permutations(list(entry.items()))))
    if draw(st.booleans()):
        body = dict(draw(st.permutations(list(body.items()))))
    text = json.dumps(
        body,
        separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " :\n")])),
        indent=draw(st.sampled_from([None, 0, 2])),
        ensure_ascii=draw(st.booleans()),
    )
    return text.encode(), end, False


def reference(data: bytes, data_end: int) -> tuple[int, dict[str, codec.TensorInfo]]:
    level, tensors = codec._decode_json(data, data_end, codec.DEFAULT_MAX_RATIO)
    for name, info in tensors.items():  # what the columns cannot hold is refused
        if codec._name_bytes(name) is None:
            raise UnicodeEncodeError("utf-8", name, 0, 1, "not valid Unicode")
        if any(d >= 1 << 63 for d in info.shape):  # beside a zero dimension
            raise OverflowError("too large")
    return level, tensors


def same_outcome(data: bytes, data_end: int) -> None:
    """decode_header and the reference agree: the same level and tensors (listed in byte
    order), or both refuse with ContainerError."""
    try:
        expected: Any = reference(data, data_end)
    except codec.ContainerError:
        expected = None
    except UnicodeEncodeError:
        expected = "not valid Unicode"
    except OverflowError:
        expected = "too large"
    scanned = codec._scan(data, data_end, codec.DEFAULT_MAX_RATIO)
    if scanned is not None:  # the fast path never accepts what the reference refuses
        assert isinstance(expected, tuple)
        assert scanned[0] == expected[0]
        assert dict(scanned[1].items()) == expected[1]
    refused = None
    try:
        level, table = codec.decode_header(data, crc32c(data), data_end)
    except codec.ContainerError as exc:
        refused = str(exc)
    if refused is not None:
        assert expected is None or (isinstance(expected, str) and expected in refused)
        return
    assert isinstance(expected, tuple)
    assert level == expected[0]
    assert dict(table.items()) == expected[1]
    assert list(table) == sorted(expected[1], key=lambda n: n.encode("utf-8", "surrogateescape"))


def same_from_pieces(data: bytes, data_end: int, piece_bytes: int) -> None:
    """decode_header_from, reading the header ``piece_bytes`` at a time from a file where
    the frames end at ``data_end``, gives what decode_header gives, or refuses as it does."""
    file = bytes(data_end) + data

    def read(offset: int, size: int) -> bytes:
        assert offset >= 0
        assert offset + size <= len(file)
        return file[offset : offset + size]

    try:
        whole: Any = codec.decode_header(data, crc32c(data), data_end)
    except codec.ContainerError as exc:
        whole = str(exc)
    try:
        piecewise: Any = codec.decode_header_from(
            read, data_end, len(data), crc32c(data), piece_bytes=piece_bytes
        )
    except codec.ContainerError as exc:
        piecewise = str(exc)
    if isinstance(whole, str):
        assert piecewise == whole
        return
    assert piecewise[0] == whole[0]
    assert dict(piecewise[1].items()) == dict(whole[1].items())
    assert list(piecewise[1]) == list(whole[1])


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
def test_columns_give_the_tensors_json_loads_gives(case: tuple[bytes, int, bool]) -> None:
    data, end, canonical = case
    same_outcome(data, end)
    if canonical:  # what the writer writes never takes the slow path
        assert codec._scan(data, end, codec.DEFAULT_MAX_RATIO) is not None


@settings(max_examples=400, deadline=None)
@given(case=headers(), data=st.data(), syntax=st.booleans())
def test_damaged_headers_are_refused_as_json_loads_refuses_them(
    case: tuple[bytes, int, bool], data: st.DataObject, syntax: bool
) -> None:
    text, end, _ = case
    damaged = damage(text, data, syntax)
    same_outcome(bytes(damaged), max(end + data.draw(st.sampled_from([0, 0, -1, 3])), 0))


@settings(max_examples=300, deadline=None)
@given(case=headers(), data=st.data(), damaged=st.booleans(), piece=st.integers(1, 80))
def test_a_header_read_in_pieces_decodes_as_read_whole(
    case: tuple[bytes, int, bool], data: st.DataObject, damaged: bool, piece: int
) -> None:
    """Pieces of any size, cutting entries, names, numbers and escapes anywhere: the same
    tensors, or the same refusal, as the whole header (valid, respelled or damaged)."""
    text, end, _ = case
    if damaged:
        text = bytes(damage(text, data, data.draw(st.booleans())))
    same_from_pieces(text, end, piece)


def test_a_written_header_is_never_read_whole() -> None:
    """A header as encode_header writes it is scanned as it is read: no read is larger than
    a piece, and it is read once. A damaged one (its CRC) is then read whole and refused as
    decode_header refuses it."""
    tensors = {
        f"layer_{i:04d}/kernel": codec.TensorInfo(1, (4,), "raw", (codec.Chunk(16 * i, 16, 16, i),))
        for i in range(2000)
    }
    header = codec.encode_header(3, tensors)
    end = 16 * 2000
    file = bytes(end) + header
    reads: list[int] = []

    def read(offset: int, size: int) -> bytes:
        reads.append(size)
        return file[offset : offset + size]

    crc = crc32c(header)
    level, table = codec.decode_header_from(read, end, len(header), crc, piece_bytes=4096)
    assert level == 3
    assert len(table) == 2000
    assert table["layer_1999/kernel"].chunks[0].crc == 1999
    assert max(reads) <= 4096
    assert sum(reads) == len(header)
    reads.clear()
    with pytest.raises(codec.ContainerError, match="header checksum mismatch"):
        codec.decode_header_from(read, end, len(header), crc ^ 1, piece_bytes=4096)
    assert reads[-1] == len(header)  # the fallback: read whole, decided by decode_header


def test_a_long_run_in_a_header_is_rescanned_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A header whose one entry spans many pieces (a 2 MB run of whitespace inside it) is
    rescanned after reads that double each time, and decodes as the whole header does."""
    tries: list[int] = []

    class Counting:
        def match(self, data: bytes, pos: int) -> re.Match[bytes] | None:
            tries.append(pos)
            return pattern.match(data, pos)

    pattern = codec._TENSOR
    monkeypatch.setattr(codec, "_TENSOR", Counting())
    one = {"a": codec.TensorInfo(1, (4,), "raw", (codec.Chunk(0, 16, 16, 7),))}
    header = codec.encode_header(0, one)
    spaced = header.replace(b'"a":', b'"a":' + b" " * 2_000_000, 1)
    file = bytes(16) + spaced
    reads: list[int] = []

    def read(offset: int, size: int) -> bytes:
        reads.append(size)
        return file[offset : offset + size]

    _, table = codec.decode_header_from(read, 16, len(spaced), crc32c(spaced), piece_bytes=1024)
    assert table["a"] == codec.decode_header(spaced, crc32c(spaced), 16)[1]["a"]
    assert sum(reads) == len(spaced)  # scanned as read, not read again whole
    assert len(reads) == math.ceil(len(spaced) / 1024)
    # ~1,950 pieces in ~11 tries of the entry (1 + 2 + 4 + ... pieces apart), not one a piece
    assert len(tries) <= 2 + math.ceil(math.log2(len(reads)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=headers(), flip=st.integers(0, 1 << 16))
def test_a_damaged_file_is_a_corrupt_checkpoint_naming_it(
    case: tuple[bytes, int, bool], flip: int
) -> None:
    text, end, _ = case
    damaged = bytearray(text)
    damaged[flip % len(damaged)] ^= 0x5A
    header = bytes(damaged)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.zckpt"
        path.write_bytes(b"\0" * end + header + codec.encode_footer(end, header))
        message = None
        try:
            with anyckpt.sync.open(path, format="zstd") as reader:
                reader.read_many()
        except anyckpt.CorruptCheckpointError as exc:  # nothing else (ValueError, KeyError...)
            message = str(exc)
        if message is not None:
            assert str(path) in message
            assert "\n" not in message


def header(tensors: str) -> bytes:
    return b'{"format":"anyckpt-zstd","version":1,"level":3,"tensors":{' + tensors.encode() + b"}}"


def test_duplicate_names_and_names_without_bytes_are_refused() -> None:
    one = '{"dtype":4,"shape":[1],"layout":"raw","chunks":[[0,1,1,0]]}'
    two = '{"dtype":4,"shape":[1],"layout":"raw","chunks":[[1,1,1,0]]}'
    data = header(f'"a":{one},"a":{two}')
    with pytest.raises(codec.ContainerError, match="duplicate key 'a'"):
        codec.decode_header(data, crc32c(data), 2)
    data = header(f'"\\ud800":{one}')  # a lone high surrogate: no bytes under surrogateescape
    with pytest.raises(codec.ContainerError, match="not valid Unicode"):
        codec.decode_header(data, crc32c(data), 2)
    data = header(f'"\\udcc3\\udca9":{one}')  # the bytes of "é": another name's spelling
    with pytest.raises(codec.ContainerError, match="not valid Unicode"):
        codec.decode_header(data, crc32c(data), 2)
    data = header(f'"\\udc80":{one},"\\u00e9":{two}')  # escaped bytes and escaped text
    _, table = codec.decode_header(data, crc32c(data), 2)
    assert list(table) == ["\udc80", "é"]  # b"\x80" < b"\xc3\xa9"
    assert table["\udc80"].chunks == (codec.Chunk(0, 1, 1, 0),)
    assert table["é"].chunks == (codec.Chunk(1, 1, 1, 0),)


def tensor(chunks: str, dtype: int = 1, shape: str = "[2]", layout: str = "raw") -> str:
    return f'{{"dtype":{dtype},"shape":{shape},"layout":"{layout}","chunks":[{chunks}]}}'


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ('"a":' + tensor("[0,1,8,0]", shape="[2]"), ""),  # the one accepted
        ('"a":' + tensor("[0,0,8,0]"), "ratio limit"),
        ('"a":' + tensor("[0,1,3,0],[1,1,5,0]"), "splits an element"),
        ('"a":' + tensor("[0,1,8,0]", shape="[3]"), "needs 12"),
        ('"a":' + tensor("[0,1,4,0]", shape="[" + ",".join(["1"] * 255) + "]"), "absurd"),
        ('"a":' + tensor("[0,1,8,0]", layout="strings"), "does not fit"),
        ('"a":' + tensor("[0,1,8,0]", dtype=7, shape="[1]"), "does not fit"),
        ('"a":' + tensor("[0,1,8,0]", dtype=99), "malformed"),
        ('"a":' + tensor("[0,9,8,0]"), "outside the data"),
        ('"a":' + tensor("[0,1,8,4294967296]"), "outside the data"),
        ('"a":' + tensor("[0,1048577,1073741825,0]", 4, "[1073741825]"), "outside the data"),
        ('"a":' + tensor("[0,2,8,0]") + ',"b":' + tensor("[1,2,8,0]"), "overlap"),
        ('"a":' + tensor("[0,1,8,0]") + ',"a":' + tensor("[1,1,8,0]"), "duplicate key 'a'"),
        ('"a":' + tensor("", shape="[0,99999999999999999999]"), "too large"),
        ('"a":' + tensor("[0,1,8,0]", shape="[2.0]"), "non-negative integer"),
    ],
)
def test_each_rule_is_kept_by_the_columns(tensors: str, message: str) -> None:
    """A header as the writer spells it, breaking one rule: the scan leaves it to the reference
    parse, whose error is raised."""
    data = header(tensors)
    end = 1048577 if "1048577" in tensors else 8
    if not message:
        assert codec._scan(data, end, codec.DEFAULT_MAX_RATIO) is not None
        assert codec.decode_header(data, crc32c(data), end)[1]["a"].raw_size == 8
        return
    assert codec._scan(data, end, codec.DEFAULT_MAX_RATIO) is None
    with pytest.raises(codec.ContainerError, match=message):
        codec.decode_header(data, crc32c(data), end)


# -- the header written in pieces (issue 18) ----------------------------------------------


def _reference_header(level: int, tensors: dict[str, codec.TensorInfo]) -> bytes:
    """The header as the writer spelled it before it wrote it in pieces: one ``json.dumps``."""
    body: dict[str, Any] = {"format": "anyckpt-zstd", "version": codec.VERSION, "level": level}
    body["tensors"] = {
        name: {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "layout": t.layout,
            "chunks": [[c.offset, c.size, c.raw_size, c.crc] for c in t.chunks],
            **(
                {"partitions": [[list(e) for e in p] for p in t.partitions]} if t.partitions else {}
            ),
        }
        for name, t in tensors.items()
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(NAMES, max_size=12, unique=True),
    level=st.integers(-(1 << 17), 22),
    step=st.integers(1, 5),
    data=st.data(),
)
def test_header_pieces_join_to_one_json_dumps(
    names: list[str], level: int, step: int, data: st.DataObject
) -> None:
    tensors = {name: data.draw(tensor_infos(0)) for name in names}
    entries = [
        (
            name,
            codec.entry_json(
                t.dtype,
                t.shape,
                t.layout,
                [(c.offset, c.size, c.raw_size, c.crc) for c in t.chunks],
                t.partitions,
            ),
        )
        for name, t in tensors.items()
    ]
    pieces = list(codec.header_pieces(level, iter(entries), step))
    want = _reference_header(level, tensors)
    assert b"".join(pieces) == want
    assert codec.encode_header(level, tensors) == want
    assert len(pieces) == 2 + -(-len(names) // step)  # head, a piece per step, tail


def test_a_save_of_many_small_and_large_chunks_round_trips(tmp_path: Path) -> None:
    """Small chunks compressed many per pool task, large ones alone, zero-size tensors with no
    chunk, strings: every chunk lands where the header says (each verified by its crc32c)."""
    import numpy as np
    from anyckpt_zstd import format as zformat

    rng = np.random.default_rng(5)
    tensors: dict[str, Any] = {f"s{i:05d}": rng.standard_normal(3, np.float32) for i in range(1500)}
    tensors.update({f"z{i}": np.zeros((0, 2), np.float32) for i in range(3)})
    tensors["big"] = rng.standard_normal(300_000)  # 2.4 MB: 3 chunks of 1 MB
    tensors["mid"] = rng.integers(0, 9, zformat._SMALL_CHUNK // 8 + 1)  # just above small
    tensors["strings"] = np.array([b"a", b"", b"x" * 100], dtype=object)
    path = str(tmp_path / "c")
    anyckpt.sync.save(path, tensors, format="zstd", options={"chunk_bytes": 1 << 20})
    with anyckpt.sync.open(path) as reader:
        assert reader.spec("big").extra["chunks"] == 3
        assert reader.spec("z1").extra["chunks"] == 0
        out = reader.read_many()
    assert sorted(out) == sorted(tensors)
    for key, value in tensors.items():
        assert out[key].dtype == value.dtype
        assert out[key].shape == value.shape
        assert np.array_equal(out[key], value), key

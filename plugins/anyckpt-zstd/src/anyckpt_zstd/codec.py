"""The ``.zckpt`` container, sans-I/O: chunk planning, byte shuffling, header and footer.

Layout of ``PREFIX.zckpt``::

    frame*  header  footer

* Every tensor's bytes (C order, little-endian; strings as ``[u64 length]* bytes*``) are cut
  into chunks of at most ``chunk_bytes`` (a whole number of elements), each compressed as an
  independent zstd frame that records its content size. So one tensor, or the rows of one, is
  read by decompressing only its own chunks. A frame that compresses better than
  :data:`DEFAULT_MAX_RATIO` is followed by a zstd skippable frame (:func:`padding`), so that
  no chunk holds more than that many raw bytes per stored byte.
* With ``shuffle``, a chunk's bytes are transposed before compression (all first bytes of the
  elements, then all second bytes...), which groups the slowly varying exponent and high bytes
  of numbers and compresses them far better.
* The header is JSON: format version, level, and per tensor its dtype (TensorFlow DataType
  number), shape, layout, optional partitions and its chunks ``[offset, compressed size, raw
  size, crc32c of the raw bytes]``.
* The 32-byte footer is ``magic "ACKZSTD1" | u64 header offset | u64 header size |
  u32 crc32c(header) | u32 version``.

Decoders raise :class:`ContainerError` for anything inconsistent, before allocating anything.
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import re
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from anyckpt.codecs.crc import crc32c
from anyckpt.codecs.dtypes import DT_STRING, dtype_from_enum
from anyckpt.codecs.name_table import NameTable, byte_order, gather

MAGIC = b"ACKZSTD1"
VERSION = 1
FOOTER = struct.Struct("<8sQQII")
FOOTER_SIZE = FOOTER.size
MAX_HEADER_BYTES = 1 << 28
MAX_CHUNK_BYTES = 1 << 30
#: The most raw bytes a chunk may hold per stored byte (its frame plus any padding), unless the
#: reader opts in to more (``ZstdFormat(max_ratio=...)``): a file of S bytes can declare at most
#: ``DEFAULT_MAX_RATIO * S`` bytes of tensors. Measured (``bench.py --ratios``, 4 MiB chunks):
#: float weights 1.2-1.5x, token ids 7x, masks 44-59x, Adam's v with 5 % / 1 % of rows touched
#: 26x / 133x; only nearly constant chunks go beyond: v with 0.1 % of rows touched 720-3,900x,
#: zeros or any constant ~28,500x (zstd's limit: one 4-byte RLE block per 128 KiB). The writer
#: pads those (:func:`padding`), at a cost of at most 1/DEFAULT_MAX_RATIO of their raw size.
DEFAULT_MAX_RATIO = 1024
#: Largest zstd window (log2) the writer uses and the reader accepts: bounds the decoder's own
#: buffer (levels 1-19 use at most 2^23 anyway; the "ultra" levels 20-22 are held to it).
MAX_WINDOW_LOG = 23
#: zstd skippable frame (magic 0x184D2A50, u32 length, bytes): what pads a chunk.
SKIPPABLE_MAGIC = 0x184D2A50
_SKIPPABLE_HEADER = struct.Struct("<II")
LAYOUTS = ("raw", "shuffle", "strings")


class ContainerError(ValueError):
    """Bytes that are not a valid container (the caller adds the file name)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    size: int  # compressed
    raw_size: int
    crc: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: int
    shape: tuple[int, ...]
    layout: str
    chunks: tuple[Chunk, ...]
    partitions: tuple[tuple[tuple[int, int], ...], ...] = ()

    @property
    def raw_size(self) -> int:
        return sum(c.raw_size for c in self.chunks)

    @property
    def stored_size(self) -> int:
        return sum(c.size for c in self.chunks)


# -- tensor bytes -------------------------------------------------------------------------


def encode_strings(values: Sequence[bytes]) -> bytes:
    """``[u64 LE length]*`` then the bytes of every element."""
    lengths = np.array([len(v) for v in values], dtype="<u8")
    return lengths.tobytes() + b"".join(values)


def decode_strings(data: bytes | memoryview, count: int) -> list[bytes]:
    view = memoryview(data)
    if len(view) < 8 * count:
        raise ContainerError(f"{len(view)} bytes cannot hold {count} string lengths")
    lengths = np.frombuffer(view[: 8 * count], dtype="<u8")
    total = int(lengths.sum(dtype=np.uint64)) if count else 0
    if 8 * count + total != len(view) or (count and int(lengths.max()) > len(view)):
        raise ContainerError("string lengths do not add up to the stored bytes")
    out, at = [], 8 * count
    for n in lengths.tolist():
        out.append(bytes(view[at : at + n]))
        at += n
    return out


def padding(frame_size: int, raw_size: int, max_ratio: int) -> bytes:
    """A zstd skippable frame to store after a frame of ``frame_size`` bytes holding
    ``raw_size`` raw bytes, so that the chunk's ratio stays within ``max_ratio`` (``b""`` when
    it already does). zstd decoders skip it; :func:`decode_header` counts it as stored bytes."""
    missing = -(-raw_size // max_ratio) - frame_size
    if missing <= 0:
        return b""
    body = max(missing - _SKIPPABLE_HEADER.size, 0)
    return _SKIPPABLE_HEADER.pack(SKIPPABLE_MAGIC, body) + bytes(body)


def chunk_spans(raw_size: int, itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) byte ranges of the chunks of a tensor (each a whole number of elements)."""
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    return [(start, min(start + step, raw_size)) for start in range(0, raw_size, step)] or []


def shuffle(chunk: np.ndarray, itemsize: int) -> np.ndarray:
    """Transpose a chunk's bytes (uint8, a whole number of elements) by byte position."""
    if itemsize == 1:
        return chunk
    return np.ascontiguousarray(chunk.reshape(-1, itemsize).T).reshape(-1)


def unshuffle(chunk: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return chunk
    return np.ascontiguousarray(chunk.reshape(itemsize, -1).T).reshape(-1)


# -- header and footer --------------------------------------------------------------------


#: The header's JSON spelling: compact, non-ASCII as it is (``json.dumps`` with these options).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: Tensors per piece of a header written in pieces (:func:`header_pieces`).
HEADER_STEP = 1024


def entry_json(
    dtype: int,
    shape: Sequence[int],
    layout: str,
    chunks: Sequence[Sequence[int]],
    partitions: Sequence[Sequence[Sequence[int]]] = (),
) -> dict[str, Any]:
    """A tensor's entry as the header's JSON holds it (``chunks``: ``[offset, size, raw
    size, crc]`` each)."""
    entry: dict[str, Any] = {
        "dtype": dtype,
        "shape": list(shape),
        "layout": layout,
        "chunks": [list(c) for c in chunks],
    }
    if partitions:
        entry["partitions"] = [[list(e) for e in p] for p in partitions]
    return entry


def header_pieces(
    level: int, entries: Iterable[tuple[str, dict[str, Any]]], step: int = HEADER_STEP
) -> Iterator[bytes]:
    """The bytes of :func:`encode_header`, in pieces of ``step`` entries (``(name,
    entry_json(...))`` in the order given): only one piece's entries exist at a time when
    ``entries`` makes them lazily, so a header of a million tensors is never whole in memory."""
    head = _JSON.encode({"format": "anyckpt-zstd", "version": VERSION, "level": level})
    yield (head[:-1] + ',"tensors":{').encode("utf-8")
    items = iter(entries)
    separator = ""
    while batch := dict(itertools.islice(items, step)):
        yield (separator + _JSON.encode(batch)[1:-1]).encode("utf-8")
        separator = ","
    yield b"}}"


def encode_header(level: int, tensors: Mapping[str, TensorInfo]) -> bytes:
    return b"".join(
        header_pieces(
            level,
            (
                (
                    name,
                    entry_json(
                        t.dtype,
                        t.shape,
                        t.layout,
                        [(c.offset, c.size, c.raw_size, c.crc) for c in t.chunks],
                        t.partitions,
                    ),
                )
                for name, t in tensors.items()
            ),
        )
    )


def encode_footer(header_offset: int, header: bytes) -> bytes:
    return FOOTER.pack(MAGIC, header_offset, len(header), crc32c(header), VERSION)


def decode_footer(footer: bytes, file_size: int) -> tuple[int, int, int]:
    """(header offset, header size, header crc32c), checked against the file size."""
    if len(footer) != FOOTER_SIZE:
        raise ContainerError(f"file too short for a footer ({file_size} bytes)")
    magic, offset, size, crc, version = FOOTER.unpack(footer)
    if magic != MAGIC:
        raise ContainerError("not an anyckpt-zstd file (bad magic)")
    if version != VERSION:
        raise ContainerError(f"container version {version} is not supported")
    if size > MAX_HEADER_BYTES or offset + size != file_size - FOOTER_SIZE:
        raise ContainerError(f"header (offset {offset}, {size} bytes) does not end at the footer")
    return offset, size, crc


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ContainerError(f"{what} must be a non-negative integer, not {value!r}")
    return value


class TensorTable(Mapping[str, TensorInfo]):
    """A header's tensors as columns, in the names' byte order: the names (a
    :class:`~anyckpt.codecs.name_table.NameTable`), dtype numbers, layouts, the dimensions and
    the chunks (flat arrays, and where each tensor's start), partitions by name (few tensors
    have any). About 70 bytes per one-chunk tensor plus its name; a :class:`TensorInfo` is
    made only for a name asked for."""

    def __init__(
        self,
        names: NameTable,
        columns: dict[str, np.ndarray],
        partitions: dict[str, tuple[tuple[tuple[int, int], ...], ...]],
    ) -> None:
        self.names = names
        self._enums = columns["enums"]
        self._layouts = columns["layouts"]
        self._dims = columns["dims"]
        self._dim_ends = columns["dim_ends"]
        self._chunk_ends = columns["chunk_ends"]
        self._offsets = columns["offsets"]
        self._sizes = columns["sizes"]
        self._raw_sizes = columns["raw_sizes"]
        self._crcs = columns["crcs"]
        self._partitions = partitions
        self._columns = (
            self._enums,
            self._layouts,
            self._dims,
            self._dim_ends,
            self._chunk_ends,
            self._offsets,
            self._sizes,
            self._raw_sizes,
            self._crcs,
        )
        # The same columns indexed as Python ints (no NumPy scalar per field).
        self._row = tuple(c.data for c in self._columns)

    def __len__(self) -> int:
        return len(self._enums)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names.names())

    def __contains__(self, key: object) -> bool:
        return self.names.position(key) is not None

    def __getitem__(self, key: str) -> TensorInfo:
        row = self.names.position(key)
        if row is None:
            raise KeyError(key)
        return self.info(row, key)

    def info(self, row: int, name: str | None = None) -> TensorInfo:
        enums, layouts, dims, dim_ends, chunk_ends, offsets, sizes, raws, crcs = self._row
        shape = tuple(dims[dim_ends[row] : dim_ends[row + 1]].tolist())
        lo, hi = chunk_ends[row], chunk_ends[row + 1]
        if hi == lo + 1:  # nearly always
            chunks: tuple[Chunk, ...] = (Chunk(offsets[lo], sizes[lo], raws[lo], crcs[lo]),)
        else:
            chunks = tuple(
                map(
                    Chunk,
                    offsets[lo:hi].tolist(),
                    sizes[lo:hi].tolist(),
                    raws[lo:hi].tolist(),
                    crcs[lo:hi].tolist(),
                )
            )
        parts = self._partitions.get(self.names.name(row) if name is None else name, ())
        return TensorInfo(enums[row], shape, LAYOUTS[layouts[row]], chunks, parts)

    def keys_in_order(self) -> list[str]:
        """Every name, in byte order (``surrogateescape``d: the order ``ZstdReader.keys``
        lists)."""
        return self.names.names()

    def nbytes(self) -> int:
        """What the columns hold (for the memory tests)."""
        return self.names.nbytes() + sum(a.nbytes for a in self._columns)


def _segments(ends: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indexes of the items of segments ``rows`` (segment ``i`` is ``[ends[i],
    ends[i + 1])``), in that order, and the new segments' ends."""
    starts, lengths = ends[:-1][rows], np.diff(ends)[rows]
    new_ends = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_ends[1:])
    index = np.arange(int(new_ends[-1]), dtype=np.int64)
    index += np.repeat(starts - new_ends[:-1], lengths)
    return index, new_ends


class _Builder:
    """Collects tensors (name in ``surrogateescape``d UTF-8, then their fields) into a
    :class:`TensorTable`."""

    def __init__(self) -> None:
        self.names = bytearray()
        self.name_ends = array("q", [0])
        self.enums = array("B")  # DataType numbers (all below 256)
        self.layouts = array("B")
        self.dims = array("q")
        self.dim_ends = array("q", [0])
        self.offsets = array("q")
        self.sizes = array("q")
        self.raw_sizes = array("I")  # at most MAX_CHUNK_BYTES
        self.crcs = array("I")
        self.chunk_ends = array("q", [0])
        self.partitions: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {}

    def add(
        self,
        name: bytes,
        enum: int,
        layout: int,
        dims: Sequence[int],
        chunks: Sequence[int],
        partitions: tuple[tuple[tuple[int, int], ...], ...] = (),
    ) -> None:
        self.names += name
        self.name_ends.append(len(self.names))
        self.enums.append(enum)
        self.layouts.append(layout)
        self.dims.extend(dims)
        self.dim_ends.append(len(self.dims))
        self.offsets.extend(chunks[0::4])
        self.sizes.extend(chunks[1::4])
        self.raw_sizes.extend(chunks[2::4])
        self.crcs.extend(chunks[3::4])
        self.chunk_ends.append(len(self.offsets))
        if partitions:
            self.partitions[name.decode("utf-8", "surrogateescape")] = partitions

    def overlap(self) -> bool:
        """Whether two chunks' stored bytes overlap."""
        starts = np.frombuffer(self.offsets, dtype=np.int64)
        stops = starts + np.frombuffer(self.sizes, dtype=np.int64)
        order = np.lexsort((stops, starts))
        starts, stops = starts[order], stops[order]
        return bool(np.any(starts[1:] < stops[:-1]))

    def build(self) -> TensorTable | None:
        """The table, in the names' byte order; None if a name occurs twice."""
        blob = bytes(self.names)
        self.names = bytearray()
        name_ends = np.frombuffer(self.name_ends, dtype=np.int64)
        dim_ends = np.frombuffer(self.dim_ends, dtype=np.int64)
        chunk_ends = np.frombuffer(self.chunk_ends, dtype=np.int64)
        columns: dict[str, np.ndarray] = {
            "enums": np.frombuffer(self.enums, dtype=np.uint8),
            "layouts": np.frombuffer(self.layouts, dtype=np.uint8),
            "dims": np.frombuffer(self.dims, dtype=np.int64),
            "offsets": np.frombuffer(self.offsets, dtype=np.int64),
            "sizes": np.frombuffer(self.sizes, dtype=np.int64),
            "raw_sizes": np.frombuffer(self.raw_sizes, dtype=np.uint32),
            "crcs": np.frombuffer(self.crcs, dtype=np.uint32),
        }
        order, duplicated = byte_order(blob, name_ends)
        if duplicated:
            return None
        if order is not None:  # (else the columns are views of the arrays built)
            blob, name_ends = gather(blob, name_ends, order)
            for key in ("enums", "layouts"):
                columns[key] = columns[key][order]
            index, dim_ends = _segments(dim_ends, order)
            columns["dims"] = columns["dims"][index]
            index, chunk_ends = _segments(chunk_ends, order)
            for key in ("offsets", "sizes", "raw_sizes", "crcs"):
                columns[key] = columns[key][index]
            del index
        columns["dim_ends"] = dim_ends
        columns["chunk_ends"] = chunk_ends
        return TensorTable(NameTable(blob, name_ends, "surrogateescape"), columns, self.partitions)


# -- the header's columns, scanned without a Python object per tensor ---------------------
#
# A header as :func:`encode_header` writes it is scanned tensor by tensor with one compiled
# pattern straight into the columns. Anything else (other key orders, other fields, floats,
# damaged bytes...) and every rule broken falls back to the reference parse (``json.loads``,
# :func:`_decode_json`), which decides and words the error: both accept the same headers and
# give the same tensors (a hypothesis test holds them equal).

_WS = rb"[ \t\n\r]*"
_NAT = rb"(?:0|[1-9][0-9]{0,18})"


def _sep(char: bytes) -> bytes:
    return _WS + char + _WS


_CHUNK = rb"\[" + _WS + _NAT + (_sep(b",") + _NAT) * 3 + _WS + rb"\]"
_HEAD = re.compile(
    rb"\{"
    + _WS
    + rb'"format"'
    + _sep(b":")
    + rb'"anyckpt-zstd"'
    + _sep(b",")
    + rb'"version"'
    + _sep(b":")
    + rb"-?"
    + _NAT
    + _sep(b",")
    + rb'"level"'
    + _sep(b":")
    + rb"(-?"
    + _NAT
    + rb")"
    + _sep(b",")
    + rb'"tensors"'
    + _sep(b":")
    + rb"\{"
    + _WS
    + rb"(\}?)"
)
_TENSOR = re.compile(
    _WS
    + rb'"((?:[^"\\\x00-\x1f]|\\.)*)"'
    + _sep(b":")
    + rb"\{"
    + _WS
    + rb'"dtype"'
    + _sep(b":")
    + rb"("
    + _NAT
    + rb")"
    + _sep(b",")
    + rb'"shape"'
    + _sep(b":")
    + rb"\["
    + _WS
    + rb"("
    + _NAT
    + rb"(?:"
    + _sep(b",")
    + _NAT
    + rb")*)?"
    + _WS
    + rb"\]"
    + _sep(b",")
    + rb'"layout"'
    + _sep(b":")
    + rb'"(raw|shuffle|strings)"'
    + _sep(b",")
    + rb'"chunks"'
    + _sep(b":")
    + rb"\["
    + _WS
    + rb"("
    + _CHUNK
    + rb"(?:"
    + _sep(b",")
    + _CHUNK
    + rb")*)?"
    + _WS
    + rb"\]"
    + rb"(?:"
    + _sep(b",")
    + rb'"partitions"'
    + _sep(b":")
    + rb"(\[[\[\]0-9, \t\n\r]*\])"
    + rb")?"
    + _WS
    + rb"\}"
    + _WS
    + rb"([,}])",
    re.DOTALL,
)
_TAIL = re.compile(_WS + rb"\}" + _WS)
_DIGITS = re.compile(rb"[0-9]+")
_LAYOUT = {name.encode(): i for i, name in enumerate(LAYOUTS)}


def _name_bytes(name: str) -> bytes | None:
    """A tensor name as the table holds it (UTF-8, ``surrogateescape``), or None if it has no
    such bytes or they read back as another name."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    return raw if raw.decode("utf-8", "surrogateescape") == name else None


def _itemsizes() -> dict[int, int]:
    """The element size of every DataType number the reader knows (strings: 1)."""
    from anyckpt.codecs.dtypes import BY_ENUM

    sizes = {int(enum): dtype.itemsize for enum, dtype in BY_ENUM.items()}
    sizes[DT_STRING] = 1
    return sizes


class _Pieces:
    """The header's bytes as a scan consumes them: a buffer refilled from the pieces read
    (the part not yet matched kept), with their UTF-8 checked and, if ``checksum``, their
    CRC summed as they come."""

    def __init__(self, pieces: Iterator[bytes], checksum: bool) -> None:
        self._pieces = pieces
        self._checksum = checksum
        self.buf = b""
        self.final = False
        self.crc = 0
        self.utf8 = True
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def more(self, pos: int) -> int:
        """Append the next piece to what is left from ``pos``; the new position (0)."""
        piece = next(self._pieces, None)
        if piece is None:
            self.final = True
            self.utf8 = self.utf8 and self._feed(b"", final=True)
            return pos
        if self._checksum:
            self.crc = crc32c(piece, self.crc)
        if self.utf8:
            self.utf8 = self._feed(piece)
        rest = self.buf[pos:]
        self.buf = rest + piece if rest else piece
        return 0

    def _feed(self, piece: bytes, final: bool = False) -> bool:
        if not final and piece.isascii() and not self._decoder.getstate()[0]:
            return True
        try:
            self._decoder.decode(piece, final)
        except UnicodeDecodeError:
            return False
        return True

    def match(self, pattern: re.Pattern[bytes], pos: int) -> tuple[re.Match[bytes] | None, int]:
        """``pattern`` matched at ``pos``, reading on while the buffer ends before a match
        could; (None, pos) only once every piece is read. Each retry reads twice as many
        pieces as the one before (a long run of one pattern is rescanned a bounded number of
        times, not once per piece)."""
        reads = 1
        while True:
            m = pattern.match(self.buf, pos)
            if self.final or (m is not None and m.end() < len(self.buf)):
                return m, pos
            for _ in range(reads):
                pos = self.more(pos)
                if self.final:
                    break
            reads *= 2


def _scan(data: bytes, data_end: int, max_ratio: int) -> tuple[int, TensorTable] | None:
    """(level, tensors) of a header written as :func:`encode_header` writes one and following
    every rule, scanned into columns; None for anything else. (Its CRC is the caller's.)"""
    return _scan_pieces(_Pieces(iter([data]), checksum=False), data_end, max_ratio)


def _scan_pieces(pieces: _Pieces, data_end: int, max_ratio: int) -> tuple[int, TensorTable] | None:
    """:func:`_scan` of a header read a piece at a time (no more of it held than the piece and
    the entry it cuts). A match that ends before the buffer does is the match over the whole
    header: every repetition in the patterns stops at a character it cannot take."""
    head, pos = pieces.match(_HEAD, 0)
    if head is None:
        return None
    level = int(head.group(1))
    closed = head.group(2) == b"}"
    pos = head.end()
    builder = _Builder()
    sizes = _itemsizes()
    digits, prod, layouts = _DIGITS.findall, math.prod, _LAYOUT
    while not closed:
        m, pos = pieces.match(_TENSOR, pos)
        if m is None:
            return None
        raw, dtype, shape, layout, chunks, parts, stop = m.groups()
        enum = int(dtype)
        itemsize = sizes.get(enum)
        strings = enum == DT_STRING
        if itemsize is None or (layout == b"strings") != strings:
            return None
        dims = [int(d) for d in shape.split(b",")] if shape else []
        fields = [int(v) for v in digits(chunks)] if chunks else []
        if len(dims) > 254:
            return None
        total = 0
        for at in range(0, len(fields), 4):
            offset, size, raw_size, crc = fields[at : at + 4]
            if (
                offset + size > data_end
                or raw_size > MAX_CHUNK_BYTES
                or crc >= 1 << 32
                or raw_size > max_ratio * size
                or (not strings and raw_size % itemsize)
            ):
                return None
            total += raw_size
        count = prod(dims)
        if (total < 8 * count) if strings else (total != count * itemsize):
            return None
        partitions: tuple[tuple[tuple[int, int], ...], ...] = ()
        if parts is not None:
            try:
                partitions = tuple(
                    tuple((_int(s, "a start"), _int(n, "a length")) for s, n in p)
                    for p in json.loads(parts)
                )
            except (ValueError, TypeError):  # ContainerError included
                return None
        if b"\\" in raw:
            try:
                name = json.loads(b'"' + raw + b'"')
            except ValueError:
                return None
            encoded = _name_bytes(name)
            if encoded is None:
                return None
            raw = encoded
        try:
            builder.add(raw, enum, layouts[layout], dims, fields, partitions)
        except OverflowError:  # a dimension past int64 (beside a zero one)
            return None
        pos = m.end()
        closed = stop == b"}"
    while not pieces.final:
        pos = pieces.more(pos)
    tail = _TAIL.match(pieces.buf, pos)
    if tail is None or tail.end() != len(pieces.buf) or not pieces.utf8 or builder.overlap():
        return None
    table = builder.build()
    return None if table is None else (level, table)


def decode_header(
    data: bytes, crc: int, data_end: int, max_ratio: int = DEFAULT_MAX_RATIO
) -> tuple[int, TensorTable]:
    """(level, tensors as columns) from the header bytes; ``data_end`` is where the frames must
    end; no chunk may hold more than ``max_ratio`` raw bytes per stored byte. No Python object
    is kept (nor, for a header written by :func:`encode_header`, made) per tensor."""
    if crc32c(data) != crc:
        raise ContainerError("header checksum mismatch")
    scanned = _scan(data, data_end, max_ratio)
    if scanned is not None:
        return scanned
    level, tensors = _decode_json(data, data_end, max_ratio)
    builder = _Builder()
    for name in list(tensors):
        t = tensors.pop(name)
        raw = _name_bytes(name)
        if raw is None:
            raise ContainerError(f"tensor name {name!r} is not valid Unicode")
        fields = [v for c in t.chunks for v in (c.offset, c.size, c.raw_size, c.crc)]
        try:
            builder.add(raw, t.dtype, LAYOUTS.index(t.layout), t.shape, fields, t.partitions)
        except OverflowError:
            raise ContainerError(
                f"entry {name!r}: a dimension of {list(t.shape)} is too large"
            ) from None
    table = builder.build()
    if table is None:  # json.loads refused any duplicate
        raise ContainerError("a tensor name occurs twice in the header")
    return level, table


#: How much of a header :func:`decode_header_from` reads at a time.
HEADER_PIECE_BYTES = 1 << 20


def decode_header_from(
    read: Callable[[int, int], bytes],
    offset: int,
    length: int,
    crc: int,
    max_ratio: int = DEFAULT_MAX_RATIO,
    piece_bytes: int = HEADER_PIECE_BYTES,
) -> tuple[int, TensorTable]:
    """:func:`decode_header` of the ``length`` header bytes at ``offset`` (where the frames
    must end), read through ``read(offset, size)`` a piece at a time. A header written by
    :func:`encode_header` is scanned as it is read and never held whole (~107 bytes per tiny
    tensor: 107 MB at 10^6); its CRC is checked once it is all read. Anything else is read
    whole and decided, errors worded, by :func:`decode_header`."""

    def pieces() -> Iterator[bytes]:
        for at in range(0, length, piece_bytes):
            yield read(offset + at, min(piece_bytes, length - at))

    stream = _Pieces(pieces(), checksum=True)
    scanned = _scan_pieces(stream, offset, max_ratio)
    if scanned is not None and stream.crc == crc:
        return scanned
    del scanned, stream
    return decode_header(read(offset, length), crc, offset, max_ratio)


def _decode_json(data: bytes, data_end: int, max_ratio: int) -> tuple[int, dict[str, TensorInfo]]:
    """The reference parse: ``json.loads`` (entries held as tuples as they are parsed), then
    every rule checked in turn; its errors are the ones :func:`decode_header` raises."""
    try:
        body = json.loads(data.decode("utf-8"), object_pairs_hook=_object)
    except ContainerError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ContainerError(f"header is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != "anyckpt-zstd":
        raise ContainerError("header is not an anyckpt-zstd header")
    raw_tensors = body.get("tensors")
    if not isinstance(raw_tensors, dict):
        raise ContainerError("header has no tensors")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int]] = []
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    for name in list(raw_tensors):  # each raw entry freed as soon as it is parsed
        info = raw_tensors.pop(name)
        if isinstance(info, _RawEntry):
            info = info.as_dict()
        tensor = _tensor(name, info, data_end, max_ratio)
        tensors[name] = replace(tensor, shape=shapes.setdefault(tensor.shape, tensor.shape))
        spans += [(c.offset, c.offset + c.size) for c in tensor.chunks]
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise ContainerError("compressed chunks overlap")
    level = body.get("level", 0)
    if isinstance(level, bool) or not isinstance(level, int):
        raise ContainerError(f"level must be an integer, not {level!r}")
    return level, tensors


_ENTRY_KEYS = ("dtype", "shape", "layout", "chunks")


class _RawEntry(tuple):  # type: ignore[type-arg]
    """A tensor entry as parsed, held as its values (no dict per entry until it is checked)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(_ENTRY_KEYS, self, strict=True))


def _object(pairs: list[tuple[str, Any]]) -> Any:
    """Each JSON object as parsed: an entry with exactly the four usual keys becomes a
    :class:`_RawEntry`, any other object a dict; a key twice in one object is refused."""
    if len(pairs) == 4 and tuple(k for k, _ in pairs) == _ENTRY_KEYS:
        return _RawEntry(v for _, v in pairs)
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ContainerError(f"duplicate key {key!r} in the header")
            seen.add(key)
    return out


def _tensor(name: str, info: Any, data_end: int, max_ratio: int) -> TensorInfo:
    if not isinstance(info, dict):
        raise ContainerError(f"entry {name!r} is not an object")
    try:
        enum = _int(info["dtype"], f"dtype of {name!r}")
        dtype = dtype_from_enum(enum)
        shape = tuple(_int(d, f"a dimension of {name!r}") for d in info["shape"])
        layout = info["layout"]
        chunks = tuple(
            Chunk(*(_int(v, f"a chunk field of {name!r}") for v in c)) for c in info["chunks"]
        )
        partitions = tuple(
            tuple((_int(s, "a partition start"), _int(n, "a partition length")) for s, n in p)
            for p in info.get("partitions", [])
        )
    except ContainerError:
        raise
    except Exception as exc:  # missing keys, wrong shapes of lists, unknown dtype numbers
        raise ContainerError(f"entry {name!r} is malformed: {exc}") from None
    if layout not in LAYOUTS or (layout == "strings") != (enum == DT_STRING):
        raise ContainerError(f"entry {name!r}: layout {layout!r} does not fit its dtype")
    if len(shape) > 254:
        raise ContainerError(f"entry {name!r}: rank {len(shape)} is absurd")
    for c in chunks:
        if c.offset + c.size > data_end or c.raw_size > MAX_CHUNK_BYTES or c.crc >= 1 << 32:
            raise ContainerError(f"entry {name!r}: chunk {c} lies outside the data")
        if c.raw_size > max_ratio * c.size:
            raise ContainerError(
                f"entry {name!r}: chunk at {c.offset} claims {c.raw_size} bytes from "
                f"{c.size}, over the {max_ratio}:1 ratio limit (ZstdFormat(max_ratio=...) "
                "raises it for a trusted file)"
            )
        if enum != DT_STRING and c.raw_size % dtype.itemsize:
            raise ContainerError(f"entry {name!r}: chunk of {c.raw_size} bytes splits an element")
    count = math.prod(shape)
    raw = sum(c.raw_size for c in chunks)
    if enum == DT_STRING:
        if raw < 8 * count:
            raise ContainerError(f"entry {name!r}: {raw} bytes cannot hold {count} strings")
    elif raw != count * dtype.itemsize:
        raise ContainerError(
            f"entry {name!r}: {raw} bytes stored, {list(shape)} of {dtype} needs "
            f"{count * dtype.itemsize}"
        )
    return TensorInfo(enum, shape, layout, chunks, partitions)

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
import re
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from anyckpt.codecs.name_table import NameTable, byte_order, gather, valid_utf8

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
_CODE_LIST = list(DTYPES)
_ITEMSIZE = {code.encode(): (i, dtype.itemsize) for i, (code, dtype) in enumerate(DTYPES.items())}


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


class EntryTable(Mapping[str, Entry]):
    """A header's entries as columns, in the names' byte order: the names (a
    :class:`~anyckpt.codecs.name_table.NameTable`), dtype ranks (uint8), offsets (int64) and
    the dimensions (one flat int64 array and where each entry's start). About 40 bytes per
    scalar entry plus its name; an :class:`Entry` is made only for a name asked for."""

    def __init__(
        self,
        names: NameTable,
        ranks: np.ndarray,
        begins: np.ndarray,
        ends: np.ndarray,
        dims: np.ndarray,
        dim_ends: np.ndarray,
    ) -> None:
        self.names = names
        self._ranks = ranks
        self._begins = begins
        self._ends = ends
        self._dims = dims
        self._dim_ends = dim_ends
        # The same columns indexed as Python ints (no NumPy scalar per field).
        self._row = tuple(c.data for c in (ranks, begins, ends, dims, dim_ends))

    def __len__(self) -> int:
        return len(self._ranks)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names.names())

    def __contains__(self, key: object) -> bool:
        return self.names.position(key) is not None

    def __getitem__(self, key: str) -> Entry:
        row = self.names.position(key)
        if row is None:
            raise KeyError(key)
        return self.entry(row)

    def entry(self, row: int) -> Entry:
        ranks, begins, ends, dims, dim_ends = self._row
        shape = tuple(dims[dim_ends[row] : dim_ends[row + 1]].tolist())
        return Entry(_CODE_LIST[ranks[row]], shape, begins[row], ends[row])

    def keys_in_order(self) -> list[str]:
        """Every name, in byte order (the order :meth:`SafetensorsReader.keys` lists)."""
        return self.names.names()

    def nbytes(self) -> int:
        """What the columns hold (for the memory tests)."""
        arrays = (self._ranks, self._begins, self._ends, self._dims, self._dim_ends)
        return self.names.nbytes() + sum(a.nbytes for a in arrays)


class _Builder:
    """Collects entries (name as UTF-8, dtype rank, dims, offsets) into an :class:`EntryTable`."""

    def __init__(self) -> None:
        self.names = bytearray()
        self.name_ends = array("q", [0])
        self.ranks = array("B")
        self.begins = array("q")
        self.ends = array("q")
        self.dims = array("q")
        self.dim_ends = array("q", [0])

    def add(self, name: bytes, rank: int, dims: Sequence[int], begin: int, end: int) -> None:
        self.names += name
        self.name_ends.append(len(self.names))
        self.ranks.append(rank)
        self.begins.append(begin)
        self.ends.append(end)
        self.dims.extend(dims)
        self.dim_ends.append(len(self.dims))

    def tiles(self, buffer: int) -> bool:
        """Whether the entries tile ``[0, buffer)`` exactly (no gap, overlap or rest)."""
        begins = np.frombuffer(self.begins, dtype=np.int64)
        ends = np.frombuffer(self.ends, dtype=np.int64)
        if not len(begins):
            return buffer == 0
        order = np.lexsort((ends, begins))
        begins, ends = begins[order], ends[order]
        return bool(begins[0] == 0 and ends[-1] == buffer and np.all(begins[1:] == ends[:-1]))

    def build(self) -> EntryTable | None:
        """The table, in the names' byte order; None if a name occurs twice."""
        blob = bytes(self.names)
        self.names = bytearray()
        name_ends = np.frombuffer(self.name_ends, dtype=np.int64)
        ranks = np.frombuffer(self.ranks, dtype=np.uint8)
        begins = np.frombuffer(self.begins, dtype=np.int64)
        ends = np.frombuffer(self.ends, dtype=np.int64)
        dims = np.frombuffer(self.dims, dtype=np.int64)
        dim_ends = np.frombuffer(self.dim_ends, dtype=np.int64)
        order, duplicated = byte_order(blob, name_ends)
        if duplicated:
            return None
        if order is not None:
            blob, name_ends = gather(blob, name_ends, order)
            kept, dim_ends = gather(dims.tobytes(), dim_ends * 8, order)
            dims, dim_ends = np.frombuffer(kept, dtype=np.int64), dim_ends // 8
            ranks, begins, ends = ranks[order], begins[order], ends[order]
        # (Not reordered: the columns are views of the arrays built.)
        return EntryTable(NameTable(blob, name_ends), ranks, begins, ends, dims, dim_ends)


@dataclass(frozen=True)
class Header:
    """A parsed header: its entries (as columns, in the names' byte order), the metadata, and
    where the buffer starts."""

    entries: EntryTable
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


#: The header's JSON spelling: compact, non-ASCII as it is (the reference's).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: Entries per piece of a header made in pieces (:func:`header_pieces`).
HEADER_STEP = 1024


def data_order(names: Iterable[str], dtypes: Iterable[np.dtype]) -> list[str]:
    """The reference's order of the data (and the header's entries): by dtype, widest first
    in its enum order, then by name (Python's order of ``str`` is the UTF-8 bytes' order)."""
    groups: dict[int, list[str]] = {}
    for name, dtype in zip(names, dtypes, strict=True):
        groups.setdefault(_RANK[dtype_code(dtype)], []).append(name)
    return ordered(groups)


def ordered(groups: dict[int, list[str]]) -> list[str]:
    """The names of ``groups`` (dtype rank: names) in :func:`data_order`; sorts the lists in
    place and empties ``groups``."""
    order: list[str] = []
    for rank in sorted(groups, reverse=True):
        group = groups.pop(rank)
        group.sort()
        if not order and not groups:
            return group  # one dtype: no copy
        order += group
    return order


def rank(code: str) -> int:
    """The position of a dtype code in the reference's enum order."""
    return _RANK[code]


def checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """``metadata`` as a dict (None if empty); TypeError unless it maps str to str."""
    if not metadata:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("safetensors metadata maps str to str")
    return dict(metadata)


def header_pieces(
    order: Sequence[str],
    spec: Callable[[str], tuple[np.dtype, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
    step: int = HEADER_STEP,
) -> Iterator[bytes]:
    """The JSON header (without its length and padding) in pieces of ``step`` entries, the
    entries of ``order`` (whose dtype and shape ``spec`` gives) made a piece at a time: a header
    of a million tensors is never whole in memory. ``b"".join`` of it is the reference's JSON."""
    # Each entry is spelled as json.dumps spells it: the name quoted (escaped by json when it
    # holds a quote, backslash or control character), then a text made once per (dtype, shape).
    kinds: dict[tuple[np.dtype, tuple[int, ...]], tuple[str, int]] = {}
    yield b"{"
    separator = ""
    if metadata:
        yield _JSON.encode({METADATA_KEY: metadata})[1:-1].encode("utf-8")
        separator = ","
    offset = 0
    for start in range(0, len(order), step):
        names = order[start : start + step]
        plain = _ESCAPED.search("".join(names)) is None
        texts = []
        for name in names:
            key = spec(name)
            kind = kinds.get(key)
            if kind is None:
                if len(kinds) >= _KINDS:
                    kinds.clear()
                dtype, shape = key
                kind = kinds[key] = (
                    f':{{"dtype":"{dtype_code(dtype)}","shape":{_JSON.encode(list(shape))},'
                    '"data_offsets":[',
                    math.prod(shape) * dtype.itemsize,
                )
            text, size = kind
            end = offset + size
            if plain:
                texts.append(f'"{name}"{text}{offset},{end}]}}')
            else:
                texts.append(f"{_JSON.encode(name)}{text}{offset},{end}]}}")
            offset = end
        yield (separator + ",".join(texts)).encode("utf-8")
        separator = ","
    yield b"}"


#: What json escapes in a name (with ``ensure_ascii=False``).
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')
#: At most this many (dtype, shape) texts are kept while a header is made.
_KINDS = 4096


def header_head(json_size: int) -> bytes:
    """What comes before a JSON header of ``json_size`` bytes: its padded length."""
    return _U64.pack(json_size + header_padding(json_size))


def header_padding(json_size: int) -> int:
    """The spaces after a JSON header of ``json_size`` bytes that align the buffer to 8."""
    return -(json_size + 8) % 8


def encode_header(
    tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[str]]:
    """The file's first bytes (length + padded JSON), and the order to write the data in."""
    order = data_order(tensors, (dtype for dtype, _ in tensors.values()))
    checked = checked_metadata(metadata)
    if METADATA_KEY in tensors:
        raise ValueError(f"{METADATA_KEY!r} is reserved in safetensors")
    text = b"".join(
        header_pieces(order, lambda name: (tensors[name][0], tuple(tensors[name][1])), checked)
    )
    return header_head(len(text)) + text + b" " * header_padding(len(text)), order


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


# -- the header's columns, scanned without a Python object per entry ----------------------
#
# A header as the reference implementation and anyckpt write it (the keys of an entry in the
# order dtype, shape, data_offsets; integers without sign, fraction or exponent) is scanned
# entry by entry with one compiled pattern straight into the columns. Anything else (other key
# orders, floats, unknown dtypes, damaged bytes...) and every rule broken falls back to the
# reference parse (``json.loads``, :func:`_decode_json`), which decides and words the error:
# both accept the same headers and give the same entries (a hypothesis test holds them equal).

_WS = rb"[ \t\n\r]*"
_STRING = rb'"((?:[^"\\\x00-\x1f]|\\.)*)"'
_ANY_STRING = rb'"(?:[^"\\\x00-\x1f]|\\.)*"'
_NAT = rb"(?:0|[1-9][0-9]{0,18})"


def _sep(char: bytes) -> bytes:
    return _WS + char + _WS


_ENTRY = re.compile(
    _WS
    + _STRING
    + _sep(b":")
    + rb"\{"
    + _WS
    + rb'"dtype"'
    + _sep(b":")
    + rb'"([A-Z0-9_]{1,16})"'
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
    + rb'"data_offsets"'
    + _sep(b":")
    + rb"\["
    + _WS
    + rb"("
    + _NAT
    + rb")"
    + _sep(b",")
    + rb"("
    + _NAT
    + rb")"
    + _WS
    + rb"\]"
    + _WS
    + rb"\}"
    + _WS
    + rb"([,}])",
    re.DOTALL,
)
_PAIR = _ANY_STRING + _sep(b":") + _ANY_STRING
_METADATA = re.compile(
    _WS
    + rb'"__metadata__"'
    + _sep(b":")
    + rb"(\{"
    + _WS
    + rb"(?:"
    + _PAIR
    + rb"(?:"
    + _sep(b",")
    + _PAIR
    + rb")*)?"
    + _WS
    + rb"\})"
    + _WS
    + rb"([,}])",
    re.DOTALL,
)
_EMPTY = re.compile(rb"\{" + _WS + rb"\}")
_REST = re.compile(_WS)


def _string(raw: bytes) -> str | None:
    """A JSON string's contents (without quotes) as ``str``, or None if it does not decode."""
    if b"\\" not in raw:
        return raw.decode("utf-8")
    try:
        value = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _scan(text: bytes, buffer: int) -> tuple[EntryTable, dict[str, str] | None] | None:
    """The entries and metadata of a header that follows every rule, scanned into columns;
    None for anything else (:func:`decode_header` then asks :func:`_decode_json`)."""
    if not valid_utf8(text):
        return None
    builder = _Builder()
    metadata: dict[str, str] | None = None
    empty = _EMPTY.match(text)
    pos = 1
    closed = empty is not None
    if empty is not None:
        pos = empty.end()
    entry, meta, sizes, prod = _ENTRY.match, _METADATA.match, _ITEMSIZE, math.prod
    while not closed:
        m = entry(text, pos)
        if m is not None:
            raw, code, shape, first, last, stop = m.groups()
            known = sizes.get(code)
            if known is None:
                return None
            dims = [int(d) for d in shape.split(b",")] if shape else []
            begin, end = int(first), int(last)
            if len(dims) > 1024 or end > buffer or end - begin != prod(dims) * known[1]:
                return None
            if b"\\" in raw:
                name = _string(raw)
                if name is None or name == METADATA_KEY:
                    return None
                try:
                    raw = name.encode("utf-8")
                except UnicodeEncodeError:
                    return None
            elif raw == b"__metadata__":
                return None
            try:
                builder.add(raw, known[0], dims, begin, end)
            except OverflowError:  # a dimension past int64 (beside a zero one)
                return None
        else:
            m = meta(text, pos)
            if m is None or metadata is not None:
                return None
            try:
                parsed = json.loads(m.group(1).decode("utf-8"), object_pairs_hook=_no_duplicates)
            except ValueError:  # HeaderError (a duplicate key) included
                return None
            metadata = parsed
            stop = m.group(2)
        pos = m.end()
        closed = stop == b"}"
    rest = _REST.match(text, pos)
    if rest is None or rest.end() != len(text) or not builder.tiles(buffer):
        return None
    table = builder.build()
    return None if table is None else (table, metadata)


def decode_header(text: bytes, file_size: int) -> Header:
    """Parse and validate the JSON header (``text`` without its 8-byte length) into columns.
    Entries number at most the header's bytes (zero-size ones) and the buffer's, which they
    must tile exactly; no Python object is kept (nor, for a header written as the reference
    writes one, made) per entry."""
    if not text.startswith(b"{"):
        raise HeaderError("the header does not start with '{'")
    data_start = len(text) + 8
    scanned = _scan(text, file_size - data_start)
    if scanned is not None:
        return Header(scanned[0], scanned[1], data_start)
    entries, metadata = _decode_json(text, file_size)
    builder = _Builder()
    for name, entry in entries.items():
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            raise HeaderError(f"entry name {name!r} is not valid Unicode") from None
        try:
            builder.add(raw, _RANK[entry.dtype], entry.shape, entry.begin, entry.end)
        except OverflowError:
            raise HeaderError(
                f"entry {name!r}: a dimension of {list(entry.shape)} is too large"
            ) from None

    del entries
    table = builder.build()
    assert table is not None  # json.loads refused any duplicate
    return Header(table, metadata, data_start)


def _decode_json(text: bytes, file_size: int) -> tuple[dict[str, Entry], dict[str, str] | None]:
    """The reference parse: ``json.loads`` (entries made compact as they are parsed), then every
    rule checked in turn; its errors are the ones :func:`decode_header` raises."""
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
    return entries, metadata


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

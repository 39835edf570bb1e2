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

import itertools
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from anyckpt.codecs.crc import crc32c
from anyckpt.codecs.dtypes import DT_STRING, dtype_from_enum

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


def encode_header(level: int, tensors: dict[str, TensorInfo]) -> bytes:
    body: dict[str, Any] = {"format": "anyckpt-zstd", "version": VERSION, "level": level}
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


def decode_header(
    data: bytes, crc: int, data_end: int, max_ratio: int = DEFAULT_MAX_RATIO
) -> tuple[int, dict[str, TensorInfo]]:
    """(level, tensors) from the header bytes; ``data_end`` is where the frames must end; no
    chunk may hold more than ``max_ratio`` raw bytes per stored byte."""
    if crc32c(data) != crc:
        raise ContainerError("header checksum mismatch")
    try:
        body = json.loads(data.decode("utf-8"), object_pairs_hook=_object)
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
    :class:`_RawEntry`, any other object a dict (its last value winning, as ``json.loads``)."""
    if len(pairs) == 4 and tuple(k for k, _ in pairs) == _ENTRY_KEYS:
        return _RawEntry(v for _, v in pairs)
    return dict(pairs)


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

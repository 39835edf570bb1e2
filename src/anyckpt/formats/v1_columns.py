"""Writing a V1 file of many whole tensors column-wise (issue 18, target 2).

The same bytes as :func:`.v1._write_file`, without a Python object per tensor: the names
are packed (:class:`~anyckpt.codecs.packed.PackedBytes`), each tensor's (dtype, shape) is a
number into the few distinct kinds (:class:`~anyckpt.codecs.v1_packed.Kinds`), the meta is
made and written a chunk of tensors at a time, and the entries are laid out and written a
range of table blocks at a time (:class:`~anyckpt.codecs.table_packed.TableBuild`), the
bytes of small tensors gathered a range at a time (one ``np.concatenate`` per run of a
dtype: no buffer exported from the caller's arrays).

Used for files of plain NumPy arrays (no :class:`~anyckpt.Partitioned`) each below
:data:`COLUMNS_BELOW` bytes (a range's values are copies), of V1 dtypes and valid UTF-8
names; anything else takes the streaming writer (:func:`.v1._write_file`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..codecs import v1 as codec
from ..codecs.crc import crc32c, mask
from ..codecs.dtypes import enum_from_dtype, to_little_endian
from ..codecs.ordered_code import encode_tensor_name_slice
from ..codecs.packed import Column, HeadedBytes, PackedBytes
from ..codecs.table import BLOCK_SIZE, NO_COMPRESSION
from ..codecs.table_packed import TableBuild
from ..codecs.v1_packed import (
    Kinds,
    SliceKeys,
    entry_values,
    has_escapes,
    meta_head,
    meta_inner_size,
    meta_pieces,
)
from ..codecs.varint import encode_varint
from ..errors import UnsupportedFormatError
from ..storage import FileWriter, Storage
from .v2_data import _classify, _gather_tiny, _kinds_and_sizes, _Numbering

#: Largest tensor (bytes) a file written column-wise may hold: each range's values are
#: copies of its tensors' bytes (a few times, as they are laid out).
COLUMNS_BELOW = 1 << 20


@dataclass
class ColumnFile:
    """One V1 file's tensors, in key order: names, arrays and kinds."""

    names: PackedBytes | None  # bytewise increasing (None once its keys are made)
    arrays: Sequence[np.ndarray]
    kind_ids: np.ndarray  # int32, into ColumnPlan.kinds


@dataclass
class ColumnPlan:
    """The files of a save written column-wise, and the kinds their tensors are of."""

    files: list[ColumnFile]
    kinds: Kinds
    shapes: list[tuple[int, ...]]  # each kind's
    enums: list[int]  # each kind's TF dtype number
    dtype_ids: np.ndarray  # each kind's dtype, numbered (runs of one are gathered at once)
    nbytes: np.ndarray  # int64: each kind's bytes in memory (at most its data's, but strings)


def plan(groups: Sequence[tuple[PackedBytes, Sequence[np.ndarray]]]) -> ColumnPlan | None:
    """The plan for writing these files (names in key order, their arrays) column-wise, or
    None if one holds what only the streaming writer handles (a dtype V1 cannot hold, a
    tensor of :data:`COLUMNS_BELOW` bytes or more, a name not valid UTF-8: the streaming
    writer raises the right error)."""
    numbering: _Numbering[tuple[np.dtype, tuple[int, ...]]] = _Numbering()
    files = []
    for names, arrays in groups:
        if not names.data.isascii() and not all(map(_utf8, names)):
            return None
        kind_ids, sizes = _kinds_and_sizes(arrays, numbering)
        if len(sizes) and int(sizes.max()) >= COLUMNS_BELOW:
            return None
        files.append(ColumnFile(names, arrays, kind_ids))
    described = []
    dtypes: _Numbering[np.dtype] = _Numbering()
    for dtype, shape in numbering:
        try:
            enum = enum_from_dtype(dtype)
            codec.check_v1_dtype(enum)
        except (ValueError, UnsupportedFormatError, TypeError):
            return None
        described.append((enum, shape, _classify(dtype)[1], dtypes[dtype]))
    kinds = Kinds.of([(enum, shape, direct) for enum, shape, direct, _ in described])
    return ColumnPlan(
        files,
        kinds,
        [shape for _, shape, _, _ in described],
        [enum for enum, _, _, _ in described],
        np.array([d for _, _, _, d in described], dtype=np.int32),
        np.array([dtype.itemsize * math.prod(shape) for dtype, shape in numbering], np.int64),
    )


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_META_RESTARTS = struct.pack("<II", 0, 1)  # a block of one entry: one restart point, at 0


def write_file(
    storage: Storage,
    path: str,
    file: ColumnFile,
    durable: bool,
    check_cancelled: Callable[[], None],
    done: Callable[[FileWriter], None],
    *,
    columns: ColumnPlan,
) -> None:
    """:func:`.v1._write_file` for ``file`` of ``columns``: stream one V1 table to a
    temporary file and hand its writer, not yet committed, to ``done``."""
    kinds, kind_ids, arrays = columns.kinds, file.kind_ids, file.arrays
    assert file.names is not None
    count = len(file.names)
    keys, names = _keys_and_names(file.names, file.kind_ids, columns)
    file.names = None  # (the keys and ``names`` hold them)
    inner = meta_inner_size(names, count, kinds, kind_ids)
    meta_size = len(meta_head(inner)) + inner
    head = encode_varint(0) * 2 + encode_varint(meta_size)
    alone = len(head) + meta_size + len(_META_RESTARTS) >= BLOCK_SIZE
    table_keys: Sequence[bytes] = keys
    if not alone:  # a small file (its meta below a block): its keys packed, after the meta's
        packed = keys if isinstance(keys, PackedBytes) else keys.part(0, count)
        table_keys = HeadedBytes(b"", packed)
    lead = 0 if alone else 1  # table entries before the tensors'

    def values(low: int, high: int) -> Column:
        check_cancelled()
        first = None
        if low < lead:  # the meta shares the first block: it is the first value
            first = b"".join(meta_pieces(names, count, kinds, kind_ids))
        a, b = max(low - lead, 0), high - lead
        ids = kind_ids[a:b]
        chunk = arrays[a:b]
        direct = kinds.direct[ids]
        gathered = [x for x, d in zip(chunk, direct.tolist(), strict=True) if d]
        data = _gather_tiny(gathered, columns.dtype_ids[ids[direct]])
        del gathered
        others = {}
        if not direct.all():
            column = names(a, b)
            for i in np.flatnonzero(~direct).tolist():
                others[i] = _other_value(path, storage, column.item(i), chunk[i], columns, ids[i])
        try:
            return entry_values(names(a, b), kinds, ids, data, others, first=first)
        finally:
            del data, others

    def value_sizes(low: int, high: int) -> np.ndarray:
        """Bytes of data of entries ``low:high`` (strings: 8 an element: see plan)."""
        sizes: np.ndarray = columns.nbytes[kind_ids[max(low - lead, 0) : high - lead]]
        return sizes if low >= lead else np.concatenate([np.zeros(lead, np.int64), sizes])

    build = TableBuild(
        table_keys,
        values,
        layout=False,
        first_block=(b"", len(head) + meta_size + 8) if alone else None,
        value_sizes=value_sizes,
    )
    writer = storage.open_writer(path, durable=durable)
    try:
        if alone:  # the meta in a block of its own, written as it is made
            writer.write(head)
            crc = crc32c(head)
            for piece in meta_pieces(names, count, kinds, kind_ids):
                check_cancelled()
                writer.write(piece)
                crc = crc32c(piece, crc)
            crc = crc32c(_META_RESTARTS, crc)
            writer.write(
                _META_RESTARTS + struct.pack("<BI", NO_COMPRESSION, mask(crc32c(b"\0", crc)))
            )
        for piece in build.pieces():
            writer.write(piece)
        done(writer)
    except BaseException:
        writer.abort()
        raise


def _keys_and_names(
    names: PackedBytes, kind_ids: np.ndarray, columns: ColumnPlan
) -> tuple[SliceKeys | PackedBytes, Callable[[int, int], Column]]:
    """The slice keys of these tensors (made a range at a time unless a name is escaped in
    them), and their names ``low:high`` as a column on demand."""
    keys: SliceKeys | PackedBytes
    if not has_escapes(names):
        keys = SliceKeys(names, columns.kinds, kind_ids)
    else:  # a name with a 0x00 or 0xFF byte: escaped, key by key
        shapes = columns.shapes
        keys = PackedBytes.join(
            (
                encode_tensor_name_slice(raw, codec.whole(len(shapes[k])))
                for raw, k in zip(names, kind_ids.tolist(), strict=True)
            ),
            len(names),
            increasing=True,
        )
    data = np.frombuffer(names.data, dtype=np.uint8)

    def names_of(low: int, high: int) -> Column:
        return Column(data, names.starts[low:high], names.lengths[low:high])

    return keys, names_of


def _other_value(
    path: str, storage: Storage, name: bytes, array: np.ndarray, columns: ColumnPlan, kind: int
) -> bytes:
    """The value of a tensor of a kind that is not direct, encoded on its own."""
    shape = columns.shapes[kind]
    data = array if array.dtype == object else to_little_endian(array)
    try:
        _, parts = codec.encode_slice_entry(
            name, codec.whole(len(shape)), data, columns.enums[kind]
        )
    except ValueError as exc:
        raise UnsupportedFormatError(str(exc), path=storage.url(path)) from None
    return b"".join(parts)

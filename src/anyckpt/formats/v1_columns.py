"""Writing a V1 file of many whole tensors column-wise (issue 18, target 2).

The same bytes as :func:`.v1._write_file`, without a Python object per tensor: the names
are packed (:class:`~anyckpt.codecs.packed.PackedBytes`), each tensor's (dtype, shape) is a
number into the few distinct kinds (:class:`~anyckpt.codecs.v1_packed.Kinds`), the meta is
made and written a chunk of tensors at a time, and the entries are laid out and written a
range of table blocks at a time (:class:`~anyckpt.codecs.table_packed.TableBuild`), the
bytes of small tensors gathered a range at a time (one ``np.concatenate`` per run of a
dtype: no buffer exported from the caller's arrays).

A file holding a tensor of :data:`COLUMNS_BELOW` bytes or more (a range's values are
copies of its tensors' bytes) is written entry by entry instead
(:class:`~anyckpt.codecs.v1.TableWriter`) from the same columns, its large tensors from their
own buffers. Used for saves of plain NumPy arrays (no :class:`~anyckpt.Partitioned`) of V1
dtypes with valid UTF-8 names; anything else takes the streaming writer
(:func:`.v1._write_file`), which raises the errors.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
from .v2_data import Numbering, classify_dtype, gather_tiny, kinds_and_sizes

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: A file holding a tensor of this many bytes or more is written entry by entry: each
#: range of a table built at once holds copies of its tensors' bytes (a few, as they are
#: laid out), and a large tensor is better written from its own buffer.
COLUMNS_BELOW = 1 << 20


@dataclass
class ColumnFile:
    """One V1 file's tensors, in key order: names, arrays and kinds."""

    names: PackedBytes | None  # bytewise increasing (None once its keys are made)
    arrays: Sequence[np.ndarray]
    kind_ids: np.ndarray  # int32, into ColumnPlan.kinds
    large: bool  # holds a tensor of COLUMNS_BELOW bytes or more: written entry by entry


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
    None if one holds what only the streaming writer handles (a dtype V1 cannot hold or a
    name not valid UTF-8: the streaming writer raises the right error)."""
    numbering: Numbering[tuple[np.dtype, tuple[int, ...]]] = Numbering()
    files = []
    for names, arrays in groups:
        if not names.data.isascii() and not all(map(_utf8, names)):
            return None
        kind_ids, sizes = kinds_and_sizes(arrays, numbering)
        large = bool(len(sizes)) and int(sizes.max()) >= COLUMNS_BELOW
        files.append(ColumnFile(names, arrays, kind_ids, large))
    described = []
    dtypes: Numbering[np.dtype] = Numbering()
    for dtype, shape in numbering:
        try:
            enum = enum_from_dtype(dtype)
            codec.check_v1_dtype(enum)
        except (ValueError, UnsupportedFormatError, TypeError):
            return None
        described.append((enum, shape, classify_dtype(dtype)[1], dtypes[dtype]))
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
    kind_ids = file.kind_ids
    assert file.names is not None
    count = len(file.names)
    keys, names = _keys_and_names(file.names, file.kind_ids, columns)
    file.names = None  # (the keys and ``names`` hold them)
    made = _Values(storage, path, columns, file.arrays, kind_ids, names, check_cancelled)
    writer = storage.open_writer(path, durable=durable)
    try:
        if file.large:
            _write_streamed(writer, keys, made, count)
        else:
            _write_built(writer, keys, made, count)
        done(writer)
    except BaseException:
        writer.abort()
        raise


@dataclass
class _Values:
    """What the entries' values of one file are made from, and how."""

    storage: Storage
    path: str
    columns: ColumnPlan
    arrays: Sequence[np.ndarray]
    kind_ids: np.ndarray
    names: Callable[[int, int], Column]
    check_cancelled: Callable[[], None]

    def meta(self, count: int) -> Iterator[Buffer]:
        """The meta value, in pieces (:func:`~anyckpt.codecs.v1_packed.meta_pieces`)."""
        return meta_pieces(self.names, count, self.columns.kinds, self.kind_ids)

    def of(
        self, a: int, b: int, *, first: bytes | None = None, apart: np.ndarray | None = None
    ) -> Column:
        """The values of tensors ``a:b`` (after ``first``, if given); those ``apart`` (a
        mask) are left empty, for the caller to write from their own buffers."""
        self.check_cancelled()
        kinds, columns = self.columns.kinds, self.columns
        ids = self.kind_ids[a:b]
        chunk = self.arrays[a:b]
        direct = kinds.direct[ids]
        if apart is not None:
            direct &= ~apart
        gathered = [x for x, d in zip(chunk, direct.tolist(), strict=True) if d]
        data = gather_tiny(gathered, columns.dtype_ids[ids[direct]])
        del gathered
        others = {}
        indirect = ~direct if apart is None else ~direct & ~apart
        if indirect.any():
            column = self.names(a, b)
            for i in np.flatnonzero(indirect).tolist():
                others[i] = self.encoded(column.item(i), chunk[i], int(ids[i]))
        try:
            return entry_values(
                self.names(a, b), kinds, ids, data, others, first=first, direct=direct
            )
        finally:
            del data, others

    def encoded(self, name: bytes, array: np.ndarray, kind: int) -> bytes:
        """The value of a tensor of a kind that is not direct, encoded on its own."""
        return b"".join(self.parts(name, array, kind))

    def parts(self, name: bytes, array: np.ndarray, kind: int) -> list[Buffer]:
        """The value of one tensor, encoded on its own: its data the array's buffer when
        it is stored as it is (no copy)."""
        shape = self.columns.shapes[kind]
        data = array if array.dtype == object else to_little_endian(array)
        try:
            _, parts = codec.encode_slice_entry(
                name, codec.whole(len(shape)), data, self.columns.enums[kind]
            )
        except ValueError as exc:
            raise UnsupportedFormatError(str(exc), path=self.storage.url(self.path)) from None
        return parts


def _write_built(
    writer: FileWriter, keys: SliceKeys | PackedBytes, made: _Values, count: int
) -> None:
    """The table of a file of tensors below COLUMNS_BELOW bytes each, a range of its
    blocks at a time (:class:`~anyckpt.codecs.table_packed.TableBuild`)."""
    kinds, kind_ids, nbytes = made.columns.kinds, made.kind_ids, made.columns.nbytes
    inner = meta_inner_size(made.names, count, kinds, kind_ids)
    meta_size = len(meta_head(inner)) + inner
    head = encode_varint(0) * 2 + encode_varint(meta_size)
    alone = len(head) + meta_size + len(_META_RESTARTS) >= BLOCK_SIZE
    table_keys: Sequence[bytes] = keys
    if not alone:  # a small file (its meta below a block): its keys packed, after the meta's
        packed = keys if isinstance(keys, PackedBytes) else keys.part(0, count)
        table_keys = HeadedBytes(b"", packed)
    lead = 0 if alone else 1  # table entries before the tensors'

    def values(low: int, high: int) -> Column:
        first = None
        if low < lead:  # the meta shares the first block: it is the first value
            first = b"".join(made.meta(count))
        return made.of(max(low - lead, 0), high - lead, first=first)

    def value_sizes(low: int, high: int) -> np.ndarray:
        """Bytes of data of entries ``low:high`` (strings: 8 an element: see plan)."""
        sizes: np.ndarray = nbytes[kind_ids[max(low - lead, 0) : high - lead]]
        return sizes if low >= lead else np.concatenate([np.zeros(lead, np.int64), sizes])

    build = TableBuild(
        table_keys,
        values,
        layout=False,
        first_block=(b"", len(head) + meta_size + 8) if alone else None,
        value_sizes=value_sizes,
    )
    if alone:  # the meta in a block of its own, written as it is made
        writer.write(head)
        crc = crc32c(head)
        for piece in made.meta(count):
            made.check_cancelled()
            writer.write(piece)
            crc = crc32c(piece, crc)
        crc = crc32c(_META_RESTARTS, crc)
        writer.write(_META_RESTARTS + struct.pack("<BI", NO_COMPRESSION, mask(crc32c(b"\0", crc))))
    for piece in build.pieces():
        writer.write(piece)


#: Tensors whose values are made at once in a file written entry by entry.
_STREAMED_CHUNK = 4096


def _write_streamed(
    writer: FileWriter, keys: SliceKeys | PackedBytes, made: _Values, count: int
) -> None:
    """The table of a file holding a tensor of COLUMNS_BELOW bytes or more, entry by entry
    (:class:`~anyckpt.codecs.v1.TableWriter`): the values of small tensors made a chunk at
    a time, large ones written from their own buffers (no copy)."""
    large_kinds = made.columns.nbytes >= COLUMNS_BELOW
    table = codec.TableWriter(BLOCK_SIZE)
    for out in table.add(codec.META_KEY, list(made.meta(count))):
        writer.write(out)
    for low in range(0, count, _STREAMED_CHUNK):
        high = min(count, low + _STREAMED_CHUNK)
        large = large_kinds[made.kind_ids[low:high]]
        values = made.of(low, high, apart=large)
        view = memoryview(values.data)  # type: ignore[arg-type]  # a uint8 array: a buffer
        starts, ends = values.starts.tolist(), (values.starts + values.lengths).tolist()
        chunk_keys = keys.part(low, high)
        column = made.names(low, high) if large.any() else None
        for i, key in enumerate(chunk_keys):
            if large[i]:
                assert column is not None
                array = made.arrays[low + i]
                parts = made.parts(column.item(i), array, int(made.kind_ids[low + i]))
            else:
                parts = [view[starts[i] : ends[i]]]
            for out in table.add(key, parts):
                writer.write(out)
        del view, values
    for out in table.finish():
        writer.write(out)


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

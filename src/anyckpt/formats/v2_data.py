"""Writing one V2 data file: tensors in key order, unpadded, each with its masked CRC-32C.

The per-tensor work is kept out of Python loops where it can be: tensors are classified by
dtype once per distinct dtype, the ordinary small ones (plain NumPy numeric dtypes, C-contiguous,
little-endian) are checksummed by one ``map`` over the C function and written straight from
their own buffers, up to IOV_MAX per ``writev``, and the index entries come back column-wise
(:class:`DataFileEntries`) for :mod:`anyckpt.codecs.bundle_packed` to encode in bulk.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from typing import TypeVar

import crc32c as _crc32c
import numpy as np

from ..codecs.bundle import BundleEntry, encode_string_tensor
from ..codecs.crc import crc32c, crc32c_rows, mask_in_place
from ..codecs.dtypes import DT_STRING, enum_from_dtype, to_little_endian
from ..storage import Storage
from ._arrays import byte_view
from ._checksummed_io import write_checksummed
from .v2_layout import GATHER_BELOW, GATHER_BYTES, PARALLEL_BYTES

#: Buffers per writev call (Linux's IOV_MAX).
_BATCH = 1024
#: Tensors of fewer bytes than this (of a plain NumPy numeric dtype) are "tiny": their bytes
#: are gathered a window at a time (one ``np.concatenate``, no buffer exported per tensor:
#: NumPy caches a ~56-byte record on each array it exports) and checksummed row by row in
#: NumPy (crc32c_rows), then written with one ``write``.
TINY_BELOW = 64
#: A save of more than MANY_TENSORS tensors trades a little CPU for memory per tensor: in
#: a data file that large, tensors below SMALL_BELOW bytes are gathered too (checksummed by
#: the C ``crc32c`` per slice of the window: ~0.5 µs a tensor more CPU than checksumming and
#: ``writev``-ing them in place, but no 56-byte buffer record left on each of the caller's
#: arrays), and a one-file bundle's index is built after its data, a range of blocks at a
#: time, not whole on a second core meanwhile (formats.v2). At 10^6 1 KiB tensors: 226 -> 99
#: B a tensor of RSS beyond the state.
SMALL_BELOW = 4096
MANY_TENSORS = 1 << 16
#: Tiny tensors gathered per window (16 MiB at most).
TINY_WINDOW = 4096

_dtype_of = attrgetter("dtype")
_shape_of = attrgetter("shape")
_nbytes_of = attrgetter("nbytes")
_contiguous = attrgetter("flags.c_contiguous")


#: A (TF dtype number, shape) pair: what an entry's encoded head depends on.
Kind = tuple[int, tuple[int, ...]]


_K = TypeVar("_K", bound=Hashable)


class Numbering(dict[_K, int]):
    """Numbers its keys 0, 1, 2... in the order they are first looked up."""

    def __missing__(self, key: _K) -> int:
        self[key] = number = len(self)
        return number


@dataclass
class DataFileEntries:
    """The index entries of one data file, in file order, as columns: each entry's dtype and
    shape as a number into ``kinds`` (a save of many tensors has few distinct ones: no tuple
    or list element per tensor), its offset, size and masked CRC as arrays."""

    shard_id: int
    keys: Sequence[bytes]
    kind_ids: np.ndarray  # integers: entry i's (dtype, shape) is kinds[kind_ids[i]]
    kinds: list[Kind]  # the distinct (TF dtype number, shape) pairs
    offsets: np.ndarray  # non-negative integers (a data file's: uint32 below 4 GiB, else int64)
    sizes: np.ndarray  # as offsets
    crcs: np.ndarray  # uint32, masked

    @classmethod
    def from_lists(
        cls,
        shard_id: int,
        keys: Sequence[bytes],
        dtypes: Sequence[int],
        shapes: Sequence[tuple[int, ...]],
        offsets: np.ndarray,
        sizes: np.ndarray,
        crcs: np.ndarray,
    ) -> DataFileEntries:
        """The entries from one dtype and one shape per entry."""
        numbering: Numbering[Kind] = Numbering()
        pairs = zip(dtypes, map(tuple, shapes), strict=True)
        ids = np.fromiter(map(numbering.__getitem__, pairs), np.int32, len(keys))
        return cls(shard_id, keys, ids, list(numbering), offsets, sizes, crcs)

    @property
    def dtypes(self) -> list[int]:
        """Each entry's TF dtype number."""
        enums = [enum for enum, _ in self.kinds]
        return list(map(enums.__getitem__, self.kind_ids.tolist()))

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each entry's shape."""
        shapes = [shape for _, shape in self.kinds]
        return list(map(shapes.__getitem__, self.kind_ids.tolist()))

    def as_entries(self) -> dict[bytes, BundleEntry]:
        """The same entries as :class:`BundleEntry` objects, by key."""
        return {
            key: BundleEntry(dtype, shape, self.shard_id, offset, size, crc)
            for key, dtype, shape, offset, size, crc in zip(
                self.keys,
                self.dtypes,
                self.shapes,
                self.offsets.tolist(),
                self.sizes.tolist(),
                self.crcs.tolist(),
                strict=True,
            )
        }


_DIRECT: dict[np.dtype, tuple[int, bool]] = {}


def classify_dtype(dtype: np.dtype) -> tuple[int, bool]:
    """(TF dtype number, whether arrays of it can be written and checksummed as they are:
    a NumPy numeric dtype exporting a plain buffer, stored little-endian)."""
    try:
        return _DIRECT[dtype]
    except KeyError:
        enum = enum_from_dtype(dtype)
        order = dtype.byteorder
        direct = (
            enum != DT_STRING
            and dtype.kind in "biufc"
            and type(dtype) is type(np.dtype(dtype.str))  # a NumPy dtype, not ml_dtypes'
            and (order in "|<" or (order == "=" and sys.byteorder == "little"))
        )
        if direct:
            try:
                memoryview(np.empty(1, dtype))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                direct = False
        _DIRECT[dtype] = pair = (enum, direct)
        return pair


def _checksum_plain(arrays: Sequence[np.ndarray], plain: np.ndarray, crcs: np.ndarray) -> None:
    """The CRCs (unmasked) of the ``plain`` arrays into ``crcs``: one ``map`` over the C
    function (all of them, the usual case: no index array)."""
    if plain.all():
        checksums = map(_crc32c.crc32c, arrays)  # type: ignore[arg-type]  # arrays are buffers
        crcs[:] = np.fromiter(checksums, dtype=np.uint32, count=len(arrays))
        return
    where = np.flatnonzero(plain)
    if len(where):
        chosen = [arrays[i] for i in where.tolist()]
        checksums = map(_crc32c.crc32c, chosen)
        crcs[where] = np.fromiter(checksums, dtype=np.uint32, count=len(where))


def _batches(sizes: np.ndarray, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """Split ``start:stop`` into runs of at most _BATCH items and about GATHER_BYTES (each
    looked for in the next _BATCH items only: no array as long as the run)."""
    first = start
    while first < stop:
        ends = np.cumsum(sizes[first : min(stop, first + _BATCH)])  # bytes up to each item
        fits = int(np.searchsorted(ends, GATHER_BYTES, side="right"))
        last = first + max(1, fits)
        yield first, last
        first = last


def gather_tiny(arrays: Sequence[np.ndarray], dtype_ids: np.ndarray) -> np.ndarray:
    """The bytes of ``arrays`` (tiny, of plain little-endian NumPy dtypes, any layout) back to
    back, each in C order, as one uint8 array: one ``np.concatenate`` per run of one dtype
    (``dtype_ids``: a number per array), without exporting a buffer per array (NumPy caches
    a buffer-export record on each array it exports: ~56 bytes a tensor of the caller's)."""
    if len(dtype_ids) == 0:
        return np.zeros(0, dtype=np.uint8)
    if dtype_ids.min() == dtype_ids.max():
        return np.concatenate(arrays, axis=None).view(np.uint8)
    changes = np.flatnonzero(dtype_ids[1:] != dtype_ids[:-1]) + 1
    bounds = [0, *changes.tolist(), len(dtype_ids)]
    return np.concatenate(
        [
            np.concatenate(arrays[a:b], axis=None).view(np.uint8)
            for a, b in itertools.pairwise(bounds)
        ]
    )


def _tiny_runs(tiny: np.ndarray) -> Iterator[tuple[int, int]]:
    """The runs of consecutive tiny tensors (``tiny``: a mask), as (start, stop)."""
    changes = np.flatnonzero(tiny[1:] != tiny[:-1]) + 1
    bounds = [0, *changes.tolist(), len(tiny)]
    for start, stop in itertools.pairwise(bounds):
        if start < stop and tiny[start]:
            yield start, stop


def _gathered_windows(
    arrays: Sequence[np.ndarray],
    kind_dtypes: np.ndarray,
    kind_ids: np.ndarray,
    start: int,
    stop: int,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Tiny tensors ``start:stop`` gathered (:func:`gather_tiny`) TINY_WINDOW at a time:
    each window's (first, last, bytes), the bytes a uint8 array. ``kind_dtypes`` numbers
    each kind's dtype, ``kind_ids`` each tensor's kind."""
    for first in range(start, stop, TINY_WINDOW):
        last = min(stop, first + TINY_WINDOW)
        yield first, last, gather_tiny(arrays[first:last], kind_dtypes[kind_ids[first:last]])


def _window_crcs(gathered: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The CRCs (unmasked) of a gathered window's tensors (``sizes``: their byte counts, back
    to back in ``gathered``): in NumPy across rows when all are short, else one C call per
    tensor on a slice of the window (a memoryview: nothing cached on anyone's array)."""
    if not len(sizes) or int(sizes.max()) < TINY_BELOW:
        return crc32c_rows(gathered, sizes)
    ends = np.cumsum(sizes, dtype=np.int64).tolist()
    view = memoryview(gathered)  # type: ignore[arg-type]  # a uint8 array: a buffer
    starts = [0, *ends[:-1]]
    return np.fromiter(
        (_crc32c.crc32c(view[a:b]) for a, b in zip(starts, ends, strict=True)),
        dtype=np.uint32,
        count=len(ends),
    )


def kinds_and_sizes(
    arrays: Sequence[np.ndarray], numbering: Numbering[tuple[np.dtype, tuple[int, ...]]]
) -> tuple[np.ndarray, np.ndarray]:
    """Each array's (dtype, shape) numbered by ``numbering`` (int32) and its size in bytes
    (uint32 while every size fits, else int64), read a window of arrays at a time (one
    slice of ``arrays`` each: a sequence that makes its items on access, such as
    :class:`~anyckpt.tensors.Reordered`, makes them once for the three attributes)."""
    count = len(arrays)
    kind_ids = np.empty(count, dtype=np.int32)
    sizes = np.empty(count, dtype=np.uint32)
    for first in range(0, count, TINY_WINDOW):
        window = arrays[first : first + TINY_WINDOW]
        n = len(window)
        pairs = zip(map(_dtype_of, window), map(_shape_of, window), strict=True)
        kind_ids[first : first + n] = np.fromiter(map(numbering.__getitem__, pairs), np.int32, n)
        window_sizes = np.fromiter(map(_nbytes_of, window), np.int64, n)
        if n and int(window_sizes.max()) > _SIZE_MAX[sizes.dtype.type]:
            sizes = sizes.astype(np.int64)  # a tensor of 4 GiB or more: wide from now on
        sizes[first : first + n] = window_sizes
    return kind_ids, sizes


#: Largest value of each dtype the sizes are kept in.
_SIZE_MAX = {np.uint32: 2**32 - 1, np.int64: 2**63 - 1}


def _with_size(sizes: np.ndarray, i: int, size: int) -> np.ndarray:
    """``sizes`` with ``sizes[i] = size``, widened to int64 first if it does not fit."""
    if size > _SIZE_MAX[sizes.dtype.type]:
        sizes = sizes.astype(np.int64)
    sizes[i] = size
    return sizes


def write_data_file(
    storage: Storage,
    path: str,
    keys: Sequence[bytes],
    arrays: Sequence[np.ndarray],
    durable: bool,
    shard_id: int,
    check_cancelled: Callable[[], None],
    early: Callable[[DataFileEntries], None] | None = None,
) -> DataFileEntries:
    """Write one data file of ``arrays`` named ``keys``, in that order; return the index
    entries of its tensors (runs in a worker thread).

    A data file of tiny tensors only (fewer than TINY_BELOW bytes each, plain NumPy dtypes;
    fewer than SMALL_BELOW in a file of more than MANY_TENSORS tensors) takes a one-pass
    path: each window of them is gathered, checksummed and written, and ``early`` is not
    called (the entries are final only once the last window is written).
    In a mixed file, tiny tensors are gathered twice: once, before anything is written, for
    their checksums, so that ``early`` can receive final entries, then again to write them.

    ``early``, if given, receives the entries before the data is written when they are
    already final then (every tensor plain, tiny or a string: no checksum left to compute
    while writing), so that the index can be built while the data goes out.

    The file's blocks are reserved first where the storage can (local files). Small tensors
    are gathered into one ``writev`` per IOV_MAX of them (where the storage offers
    ``write_many``); large ones are written in chunks while a helper thread checksums each
    chunk as it goes out (:mod:`._checksummed_io`). Bytes and checksums are the same as
    writing one by one."""
    count = len(arrays)
    if len(keys) != count:
        raise ValueError(f"{len(keys)} keys for {count} arrays")
    # Each tensor's (dtype, shape) numbered: per tensor only an int32, not a tuple.
    numbering: Numbering[tuple[np.dtype, tuple[int, ...]]] = Numbering()
    kind_ids, sizes = kinds_and_sizes(arrays, numbering)
    classes = [classify_dtype(dtype) for dtype, _ in numbering]
    kinds: list[Kind] = [
        (enum, shape) for (enum, _), (_, shape) in zip(classes, numbering, strict=True)
    ]
    dtype_numbers: Numbering[np.dtype] = Numbering()
    kind_dtypes = np.array([dtype_numbers[dtype] for dtype, _ in numbering], dtype=np.int32)
    del numbering, dtype_numbers
    direct_kinds = np.array([ok for _, ok in classes], dtype=bool)
    string_kinds = np.array([enum == DT_STRING for enum, _ in classes], dtype=bool)
    crcs = np.zeros(count, dtype=np.uint32)
    premasked = np.zeros(count, dtype=bool)  # CRCs already masked (strings, large tensors)
    # Tiny tensors (any layout): gathered and checksummed a window at a time.
    tiny = direct_kinds[kind_ids]
    tiny &= sizes < (SMALL_BELOW if count > MANY_TENSORS else TINY_BELOW)
    writer = storage.open_writer(path, durable=durable)
    try:
        reserve = getattr(writer, "reserve", None)
        if bool(tiny.all()):  # only tiny tensors: gathered, checksummed and written in one pass
            del tiny
            if reserve is not None:
                reserve(0, int(sizes.sum()))
            for first, last, gathered in _gathered_windows(arrays, kind_dtypes, kind_ids, 0, count):
                check_cancelled()
                crcs[first:last] = _window_crcs(gathered, sizes[first:last])
                if len(gathered):
                    writer.write(gathered)  # type: ignore[arg-type]  # uint8 array: a buffer
            writer.commit()
            return _entries(shard_id, keys, kind_ids, kinds, sizes, crcs, premasked)
        write_many = getattr(writer, "write_many", None)
        # A mixed file goes over its arrays several times: as a list (8 B a tensor; from a
        # view a chunk at a time, no int per position) each pass is a plain list walk.
        arrays = arrays if isinstance(arrays, list) else list(arrays)
        # Ordinary small tensors: checksummed and written as they are, in bulk.
        plain = direct_kinds[kind_ids]
        plain &= np.fromiter(map(_contiguous, arrays), dtype=bool, count=count)
        plain &= ~tiny
        if write_many is not None:
            plain &= sizes < GATHER_BELOW
        else:
            plain[:] = False
        _checksum_plain(arrays, plain, crcs)
        for start, stop in _tiny_runs(tiny):  # gathered twice: here for the CRCs, for `early`
            for first, last, gathered in _gathered_windows(
                arrays, kind_dtypes, kind_ids, start, stop
            ):
                crcs[first:last] = _window_crcs(gathered, sizes[first:last])
        # String tensors are encoded first: their stored size is known only then.
        encoded: dict[int, memoryview] = {}
        if string_kinds.any():
            for i in np.flatnonzero(string_kinds[kind_ids]).tolist():
                data, crcs[i] = encode_string_tensor(arrays[i].reshape(-1).tolist())
                encoded[i] = memoryview(data)
                sizes = _with_size(sizes, i, len(data))
                premasked[i] = True
        if reserve is not None:
            reserve(0, int(sizes.sum()))
        final: DataFileEntries | None = None
        if early is not None and bool(np.all(plain | premasked | tiny)):
            # Final already (nothing below changes a size or CRC): made once, used twice.
            final = _entries(shard_id, keys, kind_ids, kinds, sizes, crcs, premasked)
            early(final)
        groups = plain.view(np.int8) + 2 * tiny.view(np.int8)  # 0 other, 1 plain, 2 tiny
        del plain, tiny
        large = _write_in_order(
            writer,
            write_many,
            arrays,
            groups,
            kind_dtypes,
            kind_ids,
            encoded,
            sizes,
            crcs,
            check_cancelled,
        )
        for i, future in large.items():
            crcs[i] = future.result()
            premasked[i] = True
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    if final is not None:
        return final
    return _entries(shard_id, keys, kind_ids, kinds, sizes, crcs, premasked)


def _entries(
    shard_id: int,
    keys: Sequence[bytes],
    kind_ids: np.ndarray,
    kinds: list[Kind],
    sizes: np.ndarray,
    crcs: np.ndarray,
    premasked: np.ndarray,
) -> DataFileEntries:
    """The entries of tensors stored back to back with these sizes and CRCs (``premasked``:
    already masked; the others are masked in place: ``crcs`` becomes the entries'), each
    column as narrow as its values allow (kept until the index is built)."""
    mask_in_place(crcs, premasked if premasked.any() else None)
    narrow = np.uint32 if int(sizes.sum()) < 2**32 else np.int64  # a file below 4 GiB
    kept_sizes = sizes.astype(narrow, copy=False)  # (uint32 already, usually)
    offsets = np.zeros(len(sizes), dtype=narrow)
    np.cumsum(kept_sizes[:-1], out=offsets[1:])
    return DataFileEntries(
        shard_id, keys, _narrow_ids(kind_ids, len(kinds)), kinds, offsets, kept_sizes, crcs
    )


def _narrow_ids(ids: np.ndarray, count: int) -> np.ndarray:
    """Numbers below ``count`` in the narrowest unsigned dtype that holds them (a copy)."""
    dtype = np.uint8 if count <= 1 << 8 else np.uint16 if count <= 1 << 16 else ids.dtype
    narrowed: np.ndarray = ids.astype(dtype)
    return narrowed


def _write_in_order(
    writer: object,
    write_many: Callable[[list[memoryview]], None] | None,
    arrays: Sequence[np.ndarray],
    groups: np.ndarray,
    kind_dtypes: np.ndarray,
    kind_ids: np.ndarray,
    encoded: dict[int, memoryview],
    sizes: np.ndarray,
    crcs: np.ndarray,
    check_cancelled: Callable[[], None],
) -> dict[int, Future[int]]:
    """Write every tensor in order (``groups``: 0 other, 1 plain, 2 tiny): runs of tiny ones
    gathered a window at a time, runs of plain ones by batches of ``writev``, small others
    gathered too (after a byte-order or layout copy if needed; their CRCs go into ``crcs``),
    large ones alone, chunk by chunk with their checksums on a helper thread. Returns the
    futures of the large tensors' masked CRCs (done once this returns)."""
    write = writer.write  # type: ignore[attr-defined]
    pending: list[memoryview] = []
    pending_bytes = 0
    large: dict[int, Future[int]] = {}
    in_flight: list[tuple[Future[int], memoryview]] = []  # copies kept until checksummed
    helper: ThreadPoolExecutor | None = None

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            check_cancelled()
            write_many(pending)  # type: ignore[misc]
            pending, pending_bytes = [], 0

    changes = np.flatnonzero(groups[1:] != groups[:-1]) + 1
    bounds = [0, *changes.tolist(), len(arrays)]
    try:
        for start, stop in itertools.pairwise(bounds):
            if start == stop:
                continue
            if groups[start] == 2:  # a run of tiny tensors: one buffer per window
                flush()
                for _, _, gathered in _gathered_windows(arrays, kind_dtypes, kind_ids, start, stop):
                    check_cancelled()
                    if len(gathered):
                        write(gathered)
                continue
            if groups[start] == 1:  # a run of plain tensors: straight from their buffers
                flush()
                for first, last in _batches(sizes, start, stop):
                    check_cancelled()
                    write_many(list(arrays[first:last]))  # type: ignore[misc, arg-type]
                continue
            for i in range(start, stop):
                view = encoded.get(i)
                if view is None:  # one copy at a time, if the layout or byte order needs it
                    view = byte_view(to_little_endian(arrays[i]))
                    if view.nbytes >= PARALLEL_BYTES:
                        flush()
                        check_cancelled()
                        if helper is None:
                            helper = ThreadPoolExecutor(1, thread_name_prefix="anyckpt-crc")
                        in_flight = [(f, v) for f, v in in_flight if not f.done()]
                        large[i] = future = write_checksummed(write, view, helper)
                        in_flight.append((future, view))
                        continue
                    crcs[i] = crc32c(view)
                if write_many is not None and view.nbytes < GATHER_BELOW:
                    pending.append(view)
                    pending_bytes += view.nbytes
                    if len(pending) >= _BATCH or pending_bytes >= GATHER_BYTES:
                        flush()
                else:
                    flush()
                    check_cancelled()
                    write(view)
        flush()
        for future in large.values():
            future.result()
    finally:
        if helper is not None:
            helper.shutdown(wait=True, cancel_futures=True)
    return large

"""Reading a V2 bundle: the parsed index, and reads of the data files on demand."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import pairwise
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from crc32c import crc32c as _crc32c

from .._concurrency import check_cancelled, run_concurrently, run_in_worker
from ..codecs import DecodeError
from ..codecs.bundle import (
    HEADER_KEY,
    EntryRecord,
    decode_header,
    decode_record,
    decode_string_tensor,
    string_array,
)
from ..codecs.bundle_batch import ColumnsBuilder, EntryColumns
from ..codecs.crc import mask_many, masked_crc32c
from ..codecs.dtypes import (
    BY_ENUM,
    DT_STRING,
    disk_dtype,
    dtype_from_enum,
    numpy_can_shape,
)
from ..codecs.ordered_code import decode_tensor_name_slice, encode_tensor_name_slice
from ..codecs.table_lookup import LazyTable
from ..errors import CorruptCheckpointError
from ..storage import FileReader, Storage
from ..tensors import key_from_bytes, key_to_bytes
from ._arrays import byte_view, dtype_pair, empty_large
from ._checksummed_io import read_checksummed
from .base import Index, ReaderBase, TensorSlice, TensorSpec
from .v2_entries import EntryTable, KeyParts, ListedNames
from .v2_layout import (
    COALESCE_BYTES,
    GATHER_BYTES,
    PARALLEL_BYTES,
    data_path,
    index_path,
)

_KNOWN_DTYPES = frozenset(BY_ENUM)
#: Entries read at a time by a full restore: bounds the names and tuples alive besides the
#: arrays (a checkpoint of 10,000 tensors is read in one go).
READ_CHUNK = 1 << 14
_INT64_MAX = (1 << 63) - 1
#: Reads of at most this many bytes run on a kept worker thread (``run_in_worker``), which a
#: cancellation does not interrupt: they take a few milliseconds at most.
SMALL_READ_BYTES = 4 << 20

#: Entries checked together by :meth:`V2Reader._first_inconsistent`.
_CHECK_CHUNK = 1 << 16

#: :meth:`V2Reader.read_many` looks up and reads at most this many keys in one
#: uninterruptible worker hop (~10 ms of lookups); more are looked up in chunks that a
#: cancellation can stop between.
NOW_KEYS = 1024


class V2Reader(ReaderBase):
    """An open V2 bundle: the index, looked up lazily, and reads of the data files on demand.

    Opening checks the index as a table (footer, every block's bounds and checksum) and its
    header; entries are decoded and checked when first used (``spec``, ``read``,
    ``read_many``), so reading a few tensors of a large checkpoint decodes only theirs.
    :meth:`keys` decodes and checks every entry (once): a full restore, ``anyckpt verify`` and
    ``inspect`` still see every inconsistency. An inconsistent entry raises
    :class:`CorruptCheckpointError` naming the index file when it is first used.
    """

    def __init__(self, storage: Storage, prefix: str, num_shards: int, table: LazyTable) -> None:
        self.storage = storage
        self.prefix = prefix
        self.num_shards = num_shards
        #: The index as read (None once every entry is in :attr:`_columns`, which answers
        #: every question from then on: the raw index was ~26 B per tensor more).
        self._table: LazyTable | None = table
        #: Checked entries: ordinary tensors and partitioned tensors' full-name entries.
        self._entries: dict[str, EntryRecord] = {}
        #: Checked slice entries of partitioned tensors, by name and extents.
        self._slices: dict[str, dict[tuple[tuple[int, int], ...], EntryRecord]] = {}
        #: Every entry, once :meth:`keys` has decoded and checked them all.
        self._columns: EntryTable | None = None
        self._index_url = storage.url(index_path(prefix))

    @classmethod
    def from_index(cls, storage: Storage, prefix: str, data: bytes) -> V2Reader:
        where = storage.url(index_path(prefix))
        try:
            table = LazyTable(data)
            first = table.first()
            if first is None or first[0] != HEADER_KEY:
                raise DecodeError("the bundle header (key '') is missing")
            num_shards = decode_header(first[1])
        except DecodeError as exc:
            raise CorruptCheckpointError(str(exc), path=where) from None
        return cls(storage, prefix, num_shards, table)

    def _corrupt(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(message, path=self._index_url)

    def _load_all(self) -> None:
        """Decode and check every entry (for :meth:`keys`), keeping them as columns (no Python
        object per entry): the ordinary entries decoded together are checked column-wise, the
        rest (and the first failing one, to name what is wrong with it) one by one, as
        :meth:`_find` checks them."""
        # A piece of the table at a time: its keys kept, its values decoded into columns and
        # dropped (all the values' bytes at once were ~30 B per tensor at the peak).
        keys = KeyParts()
        key_ends: list[np.ndarray] = []
        builder = ColumnsBuilder()
        assert self._table is not None  # dropped only once every entry is loaded
        try:
            for piece in self._table.packed_pieces():
                skip = 0
                if not key_ends:  # the first piece starts with the header, whose key is
                    # empty: its end is where the other keys start (0)
                    if not len(piece) or piece.key(0) != HEADER_KEY:  # pragma: no cover
                        raise DecodeError("the bundle header (key '') is missing")
                    skip = 1  # and its value is no entry
                key_ends.append(piece.key_offsets[1:] + keys.size)
                keys.add(piece.keys)
                builder.add(piece.values, piece.value_offsets[skip:])
                del piece
        except DecodeError as exc:
            raise self._corrupt(str(exc)) from None
        entries = builder.finish()
        del builder
        key_offsets = np.concatenate(key_ends)
        del key_ends
        columns = EntryTable(keys, key_offsets, entries)
        del keys, entries  # the columns hold what they say
        n = len(columns)
        alone = sorted(columns.entries.alone)
        partitioned = {columns.raw(i) for i in alone if columns.entries.alone[i].slices}
        slices: dict[str, dict[tuple[tuple[int, int], ...], EntryRecord]] = {}
        listed = np.ones(n, dtype=bool)
        if partitioned:
            for i in columns.starting_with_nul().tolist():
                try:
                    name, extents = decode_tensor_name_slice(columns.raw(i))
                except DecodeError:
                    continue
                if name in partitioned:
                    entry = columns.record(i)
                    slices.setdefault(key_from_bytes(name), {})[extents] = entry
                    listed[i] = False
        columns.listed = None if listed.all() else listed
        bad = self._first_inconsistent(columns.entries)
        full_entries: dict[str, EntryRecord] = {}
        for i in sorted({*alone, *([] if bad is None else [bad])}):
            if not listed[i]:
                continue  # a slice: checked below
            key, entry = columns.name(i), columns.record(i)
            if entry.slices:
                self._check_partitioned(key, entry, slices.get(key, {}))
                full_entries[key] = entry
            else:
                self._check_plain(key, entry)
        for key, by_extent in slices.items():  # slices no full-name entry lists, too
            at = columns.position(key_to_bytes(key))
            if at is None or not listed[at]:
                # its full-name key is absent or itself the slice key of another tensor
                raise self._corrupt(f"{key!r} is both a partitioned tensor and a slice")
            full = columns.record(at)
            for extents, entry in by_extent.items():
                self._check_slice(key, extents, entry, full)
        if bad is not None:  # pragma: no cover - the checks above raise for it
            raise self._corrupt(f"the entry of {columns.name(bad)!r} is inconsistent")
        self._entries.update(full_entries)
        self._slices.update(slices)
        self._columns = columns
        self._table = None

    def _first_inconsistent(self, batch: EntryColumns) -> int | None:
        """The first entry decoded with others that :meth:`_check_plain` would refuse."""
        count = len(batch.heads)
        need = np.zeros(count, dtype=np.int64)
        string = np.zeros(count, dtype=bool)
        valid = np.ones(count, dtype=bool)
        for h, (dtype, shape) in enumerate(batch.heads):
            n = math.prod(shape)
            if dtype == DT_STRING:
                string[h] = True
            elif dtype in _KNOWN_DTYPES:
                n *= dtype_from_enum(dtype).itemsize
            else:
                valid[h] = False
            if n > _INT64_MAX or not numpy_can_shape(shape):  # sizes are int64: no match
                valid[h] = False
            else:
                need[h] = n
        for lo in range(0, len(batch.head_ids), _CHECK_CHUNK):  # no column-sized temporaries
            hi = lo + _CHECK_CHUNK
            ids = batch.head_ids[lo:hi]
            together = ids >= 0
            ids = np.where(together, ids, 0)
            sizes, want = batch.sizes[lo:hi], need[ids]
            ok = valid[ids] & (batch.shard_ids[lo:hi] < self.num_shards)
            ok &= np.where(string[ids], want <= sizes, want == sizes)
            bad = np.flatnonzero(together & ~ok)
            if bad.size:
                return lo + int(bad[0])
        return None

    def _check_plain(self, key: str, entry: EntryRecord) -> None:
        dtype_from_enum(entry.dtype, path=self._index_url)
        self._check_location(key, entry)

    def _check_partitioned(
        self,
        key: str,
        entry: EntryRecord,
        stored: dict[tuple[tuple[int, int], ...], EntryRecord],
    ) -> None:
        dtype_from_enum(entry.dtype, path=self._index_url)
        if not numpy_can_shape(entry.shape):
            raise self._corrupt(f"{key!r}: shape {list(entry.shape)} is too big for NumPy")
        for extents in entry.slices:
            if len(extents) != len(entry.shape):
                raise self._corrupt(f"slice of {key!r} has the wrong rank")
            for (start, length), dim in zip(extents, entry.shape, strict=True):
                if start < 0 or length < -1 or (length != -1 and start + length > dim):
                    raise self._corrupt(f"slice {extents} of {key!r} is outside {entry.shape}")
            if extents not in stored:
                raise self._corrupt(f"slice {extents} of {key!r} has no entry")
        if not _tiles(entry.shape, [TensorSlice(e).box(entry.shape) for e in entry.slices]):
            raise self._corrupt(f"the slices of {key!r} overlap or leave gaps")
        for extents in entry.slices:
            self._check_slice(key, extents, stored[extents], entry)

    def _check_slice(
        self, key: str, extents: tuple[tuple[int, int], ...], entry: EntryRecord, full: EntryRecord
    ) -> None:
        if entry.dtype != full.dtype:
            raise self._corrupt(f"slice {extents} of {key!r} has another dtype")
        self._check_location(key, entry)

    def _check_location(self, key: str, entry: EntryRecord) -> None:
        if entry.shard_id >= self.num_shards:
            raise self._corrupt(f"{key!r} is in shard {entry.shard_id} of {self.num_shards}")
        if not numpy_can_shape(entry.shape):
            raise self._corrupt(f"{key!r}: shape {list(entry.shape)} is too big for NumPy")
        if entry.dtype != DT_STRING:
            expected = math.prod(entry.shape) * dtype_from_enum(entry.dtype).itemsize
            if expected != entry.size:
                raise self._corrupt(
                    f"{key!r}: shape {entry.shape} needs {expected} bytes, "
                    f"the entry says {entry.size}"
                )
        elif math.prod(entry.shape) > entry.size:
            raise self._corrupt(f"{key!r}: {math.prod(entry.shape)} strings in {entry.size} bytes")

    def _lookup(self, raw: bytes) -> EntryRecord | None:
        """The decoded entry stored under ``raw`` (unchecked), or None."""
        assert self._table is not None  # looked up only before every entry is loaded
        try:
            value = self._table.get(raw)
            return None if value is None else decode_record(value)
        except DecodeError as exc:
            raise self._corrupt(str(exc)) from None

    def _find(self, key: str) -> EntryRecord | None:
        """Look ``key`` up in the index and check its entry (and a partitioned one's slices)."""
        try:
            raw = key_to_bytes(key)
        except (AttributeError, UnicodeError):
            return None
        if not raw:
            return None  # the header
        if raw[:1] == b"\0":  # a slice of a partitioned tensor is not a key of its own
            try:
                name, _ = decode_tensor_name_slice(raw)
            except DecodeError:
                pass
            else:
                holder = self._lookup(name) if name else None
                if holder is not None and holder.slices:
                    return None
        entry = self._lookup(raw)
        if entry is None:
            return None
        if not entry.slices:
            self._check_plain(key, entry)
            return entry
        stored: dict[tuple[tuple[int, int], ...], EntryRecord] = {}
        for extents in entry.slices:
            if len(extents) == len(entry.shape) and extents not in stored:
                part = self._lookup(encode_tensor_name_slice(raw, extents))
                if part is not None:
                    stored[extents] = part
        self._check_partitioned(key, entry, stored)
        self._slices[key] = stored
        return entry

    # -- metadata --------------------------------------------------------------------------

    def _all(self) -> EntryTable:
        if self._columns is None:
            self._load_all()
            assert self._columns is not None
        return self._columns

    def keys(self) -> list[str]:
        columns = self._all()
        return columns.names(columns.listed_positions())

    def key_view(self) -> Sequence[str]:
        """:meth:`keys` as a sequence whose names are made as they are read: a listing of
        10^6 tensors holds no list of 10^6 ``str`` (see :func:`.base.key_view`)."""
        return ListedNames(self._all())

    def _entry(self, key: str) -> EntryRecord:
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        columns = self._columns
        if columns is not None:  # every entry checked: made from its columns (not cached)
            at = columns.listed_position(key)
            if at is not None:
                return columns.record(at)
        else:
            entry = self._find(key)
            if entry is not None:
                self._entries[key] = entry
                return entry
        raise KeyError(f"{key!r} is not in checkpoint {self.prefix}")

    def spec(self, key: str) -> TensorSpec:
        entry = self._entry(key)
        parts = tuple(TensorSlice(extents) for extents in entry.slices)
        nbytes = (
            sum(self._slices[key][e].size for e in dict.fromkeys(entry.slices))
            if entry.slices
            else entry.size
        )
        return TensorSpec(dtype_from_enum(entry.dtype), entry.shape, parts, nbytes)

    def files(self) -> list[str]:
        return [
            *(data_path(self.prefix, i, self.num_shards) for i in range(self.num_shards)),
            index_path(self.prefix),
        ]

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> V2Reader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- data ------------------------------------------------------------------------------

    def _decode(
        self,
        key: str,
        entry: EntryRecord,
        data: bytes | None,
        out: np.ndarray | None,
        verify: bool,
        path: str,
    ) -> np.ndarray:
        """Check and shape one entry's bytes (``data`` for strings, ``out`` already filled)."""
        if entry.dtype == DT_STRING:
            assert data is not None
            try:
                values = decode_string_tensor(
                    data, math.prod(entry.shape), expected_crc=entry.crc32c if verify else None
                )
            except DecodeError as exc:
                raise CorruptCheckpointError(f"tensor {key!r}: {exc}", path=path) from None
            return string_array(values, entry.shape)
        assert out is not None
        if verify:
            actual = masked_crc32c(byte_view(out))
            if actual != entry.crc32c:
                raise CorruptCheckpointError(
                    f"tensor {key!r}: checksum mismatch (stored {entry.crc32c:#010x}, "
                    f"computed {actual:#010x})",
                    path=path,
                )
        dtype = dtype_from_enum(entry.dtype)
        return out if out.dtype == dtype else out.astype(dtype)

    def _read_shard(
        self, shard: int, wanted: list[tuple[str, EntryRecord]], verify: bool
    ) -> list[tuple[str, EntryRecord, np.ndarray]]:
        """Read entries of one data file (worker thread); entries sorted by offset."""
        path = data_path(self.prefix, shard, self.num_shards)
        url = self.storage.url(path)
        reader = self.storage.open_reader(path)
        out: list[tuple[str, EntryRecord, np.ndarray]] = []
        try:
            for key, entry in wanted:
                if entry.offset + entry.size > reader.size:
                    raise CorruptCheckpointError(
                        f"tensor {key!r} (offset {entry.offset}, size {entry.size}) lies past the "
                        f"end of the file ({reader.size} bytes)",
                        path=url,
                    )
            read_into_many = getattr(reader, "read_into_many", None)
            if self.storage.cheap_small_reads and read_into_many is not None:
                return self._read_local(reader, read_into_many, wanted, verify, url)
            for chunk in _coalesce(wanted, 1 if self.storage.cheap_small_reads else COALESCE_BYTES):
                check_cancelled()
                base = chunk[0][1].offset
                blob = None
                if len(chunk) > 1:
                    end = chunk[-1][1].offset + chunk[-1][1].size
                    blob = memoryview(reader.read(base, end - base))
                for key, entry in chunk:
                    out.append(
                        (key, entry, self._read_entry(reader, key, entry, blob, base, verify, url))
                    )
        finally:
            reader.close()
        return out

    def _read_local(
        self,
        reader: FileReader,
        read_into_many: Callable[[int, list[memoryview]], None],
        wanted: list[tuple[str, EntryRecord]],
        verify: bool,
        url: str,
    ) -> list[tuple[str, EntryRecord, np.ndarray]]:
        """Local file: runs of small neighbouring tensors are read with one ``preadv`` each,
        straight into their arrays; large tensors are read in file order by this thread
        while a helper thread checksums those already read (one sequential stream keeps the
        kernel's readahead whole; two readers would interleave and halve a cold read)."""
        out: list[tuple[str, EntryRecord, np.ndarray]] = []
        big: list[tuple[str, EntryRecord]] = []
        small: list[tuple[str, EntryRecord]] = []
        for item in wanted:
            entry = item[1]
            if entry.size >= PARALLEL_BYTES and entry.dtype != DT_STRING:
                big.append(item)
            else:
                small.append(item)
        helper: ThreadPoolExecutor | None = None
        checks: list[tuple[str, EntryRecord, np.ndarray, Future[int] | None]] = []
        try:
            if big:
                helper = ThreadPoolExecutor(1, thread_name_prefix="anyckpt-crc")
                for key, entry in big:
                    check_cancelled()
                    array = empty_large(entry.shape, dtype_pair(entry.dtype)[0])
                    view = byte_view(array)
                    crc = None
                    if verify:  # chunk by chunk, each checksummed while still in the cache
                        crc = read_checksummed(reader.read_into, entry.offset, view, helper)
                    else:
                        reader.read_into(entry.offset, view)
                    checks.append((key, entry, array, crc))
            for run in _coalesce_small(small):
                check_cancelled()
                if len(run) == 1:
                    key, entry = run[0]
                    out.append(
                        (key, entry, self._read_entry(reader, key, entry, None, 0, verify, url))
                    )
                    continue
                out += self._read_run(read_into_many, run, verify, url)
            for key, entry, array, crc in checks:
                if crc is not None and crc.result() != entry.crc32c:
                    self._decode(key, entry, None, array, verify, url)  # raises
                native = dtype_pair(entry.dtype)[1]
                out.append((key, entry, array if array.dtype == native else array.astype(native)))
        finally:
            if helper is not None:
                helper.shutdown(wait=True, cancel_futures=True)
        return out

    def _read_run(
        self,
        read_into_many: Callable[[int, list[memoryview]], None],
        run: list[tuple[str, EntryRecord]],
        verify: bool,
        url: str,
    ) -> list[tuple[str, EntryRecord, np.ndarray]]:
        """Back-to-back numeric tensors: each into its own fresh array, with one scatter
        read; their checksums computed in one pass and compared column-wise."""
        empty = np.empty
        disk = {dtype: dtype_pair(dtype)[0] for dtype in {entry.dtype for _, entry in run}}
        arrays = [empty(entry.shape, disk[entry.dtype]) for _, entry in run]
        try:
            views = [memoryview(a).cast("B") for a in arrays]  # type: ignore[arg-type]
        except (TypeError, ValueError):  # see _bytes_of
            views = list(map(_bytes_of, arrays))
        read_into_many(run[0][1].offset, views)
        if verify:
            count = len(run)
            actual = mask_many(np.fromiter(map(_crc32c, views), dtype=np.uint32, count=count))
            stored = np.fromiter((entry.crc32c for _, entry in run), dtype=np.uint32, count=count)
            for i in np.flatnonzero(actual != stored)[:1].tolist():
                key, entry = run[i]
                self._decode(key, entry, None, arrays[i], verify, url)  # raises
        if not _LITTLE_ENDIAN:
            arrays = [
                a.astype(dtype_pair(entry.dtype)[1])
                for a, (_, entry) in zip(arrays, run, strict=True)
            ]
        return [(key, entry, a) for (key, entry), a in zip(run, arrays, strict=True)]

    def _read_entry(
        self,
        reader: FileReader,
        key: str,
        entry: EntryRecord,
        blob: memoryview | None,
        base: int,
        verify: bool,
        url: str,
    ) -> np.ndarray:
        start = entry.offset - base
        if entry.dtype == DT_STRING:
            data = (
                bytes(blob[start : start + entry.size])
                if blob is not None
                else reader.read(entry.offset, entry.size)
            )
            return self._decode(key, entry, data, None, verify, url)
        dtype = disk_dtype(dtype_from_enum(entry.dtype))
        array = np.empty(entry.shape, dtype=dtype)
        if blob is not None:
            byte_view(array)[:] = blob[start : start + entry.size]
        elif entry.size:
            reader.read_into(entry.offset, byte_view(array))
        return self._decode(key, entry, None, array, verify, url)

    async def _read_entries(
        self, wanted: list[tuple[str, EntryRecord]], verify: bool
    ) -> list[tuple[str, EntryRecord, np.ndarray]]:
        by_shard: dict[int, list[tuple[str, EntryRecord]]] = defaultdict(list)
        if self.num_shards == 1:  # every entry was checked to be in shard 0
            by_shard[0] = list(wanted)
        else:
            for key, entry in wanted:
                by_shard[entry.shard_id].append((key, entry))
        results: list[tuple[str, EntryRecord, np.ndarray]] = []

        async def run(shard: int, items: list[tuple[str, EntryRecord]]) -> None:
            items.sort(key=lambda item: item[1].offset)
            # A small read on a kept thread (no thread started per event loop: see
            # run_in_worker); a large one where a cancellation can stop it between pieces.
            small = sum(entry.size for _, entry in items) <= SMALL_READ_BYTES
            hop = run_in_worker if small else anyio.to_thread.run_sync
            results.extend(await hop(self._read_shard, shard, items, verify))

        await run_concurrently(partial(run, shard, items) for shard, items in by_shard.items())
        return results

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        if keys is not None:
            names = list(keys)
            if len(names) <= NOW_KEYS:
                # Looked up and (when small and local) read in one worker hop.
                got = await run_in_worker(self.read_small_now, names, verify)
                return got if got is not None else await self.read_found(names, verify)
            # Looked up off the event loop, where a cancellation stops it.
            pairs = await anyio.to_thread.run_sync(self._look_up_all, names)
            return await self._read_pairs(pairs, verify)
        # Every entry, checked, in key order: in chunks, so that the names of only one chunk
        # exist besides the arrays read.
        columns = self._all()
        positions = columns.listed_positions()
        out: dict[str, np.ndarray] = {}
        for lo in range(0, len(positions), READ_CHUNK):
            out.update(await self._read_chunk(columns, positions[lo : lo + READ_CHUNK], verify))
        return out

    def read_small_now(self, keys: Sequence[str], verify: bool) -> dict[str, np.ndarray] | None:
        """Blocking (a worker thread): :meth:`read_many` of ``keys`` done in this thread when
        it is a small read from a storage with cheap small reads (a local disk): every key an
        ordinary tensor, at most :data:`SMALL_READ_BYTES` in all. Otherwise None, once the
        keys are looked up (their entries are kept for the read that follows). Raises
        ``KeyError`` for a key that is not in the checkpoint.

        A restore of a few tensors is then one hop to a worker thread, its index lookups
        (~5-10 µs each) off the event loop."""
        pairs = [(key, self._entry(key)) for key in keys]
        if not self.storage.cheap_small_reads or any(entry.slices for _, entry in pairs):
            return None
        if sum(entry.size for _, entry in pairs) > SMALL_READ_BYTES:
            return None
        by_shard: dict[int, list[tuple[str, EntryRecord]]] = defaultdict(list)
        for pair in pairs:
            by_shard[pair[1].shard_id].append(pair)
        out: dict[str, np.ndarray] = {}
        for shard, items in by_shard.items():
            items.sort(key=lambda item: item[1].offset)
            out.update((key, array) for key, _, array in self._read_shard(shard, items, verify))
        return {key: out[key] for key, _ in pairs}

    async def read_found(self, keys: list[str], verify: bool) -> dict[str, np.ndarray]:
        """:meth:`read_many` of ``keys`` that :meth:`read_small_now` looked up and left to
        the general path (their entries are kept: no lookup, no second hop to try again)."""
        return await self._read_pairs(list(zip(keys, map(self._entry, keys), strict=True)), verify)

    def _look_up_all(self, keys: list[str]) -> list[tuple[str, EntryRecord]]:
        """Blocking: each key with its checked entry (``KeyError`` for one not stored)."""
        pairs: list[tuple[str, EntryRecord]] = []
        for lo in range(0, len(keys), NOW_KEYS):
            check_cancelled()
            pairs += ((key, self._entry(key)) for key in keys[lo : lo + NOW_KEYS])
        return pairs

    async def _read_chunk(
        self, columns: EntryTable, chunk: np.ndarray, verify: bool
    ) -> dict[str, np.ndarray]:
        """The tensors at ``chunk`` (positions in key order), by name in that order. Small
        numeric tensors decoded with others are read from the columns (:meth:`_read_columns`:
        no tuple, record or memoryview object per tensor, so a full restore leaves the cyclic
        garbage collector next to nothing to track); the rest as :meth:`_read_pairs` reads
        them."""
        entries = columns.entries
        names = columns.names(chunk)
        arrays: list[np.ndarray | None] = [None] * len(chunk)
        fast = self._column_readable(entries, chunk)
        shard_ids = entries.shard_ids[chunk]

        async def run(shard: int) -> None:
            picked = np.flatnonzero(fast & (shard_ids == shard))
            got = await anyio.to_thread.run_sync(
                self._read_columns, columns, shard, chunk[picked], verify
            )
            if got is None:  # this storage's reader has no scatter reads: one by one
                fast[picked] = False
                return
            for i, array in zip(picked.tolist(), got, strict=True):
                arrays[i] = array

        if fast.any():
            shards = np.unique(shard_ids[fast]).tolist()
            await run_concurrently(partial(run, shard) for shard in shards)
        rest = np.flatnonzero(~fast)
        if rest.size:
            pairs = list(
                zip(
                    [names[i] for i in rest.tolist()],
                    entries.records(chunk[rest]),
                    strict=True,
                )
            )
            read = await self._read_pairs(pairs, verify)
            for i, (key, _) in zip(rest.tolist(), pairs, strict=True):
                arrays[i] = read[key]
        return dict(zip(names, arrays, strict=True))  # type: ignore[arg-type]

    def _column_readable(self, entries: EntryColumns, chunk: np.ndarray) -> np.ndarray:
        """Which entries at ``chunk`` :meth:`_read_columns` reads: small numeric tensors
        decoded with others, on a little-endian machine (no byte swap), where small reads are
        cheap (local files)."""
        if not (_LITTLE_ENDIAN and self.storage.cheap_small_reads and entries.heads):
            return np.zeros(len(chunk), dtype=bool)
        numeric = np.array([dtype != DT_STRING for dtype, _ in entries.heads] + [False])
        ids = entries.head_ids[chunk]  # -1 (decoded alone) picks the last: False
        ok: np.ndarray = numeric[ids] & (entries.sizes[chunk] < PARALLEL_BYTES)
        return ok

    def _read_columns(
        self, columns: EntryTable, shard: int, positions: np.ndarray, verify: bool
    ) -> list[np.ndarray] | None:
        """Read the entries at ``positions`` of one data file (worker thread), each into a
        fresh array, in runs of back-to-back tensors with one scatter read each; their
        checksums in one pass, compared column-wise. The arrays in the order of
        ``positions``; None if the file's reader has no scatter reads."""
        entries = columns.entries
        order = np.argsort(entries.offsets[positions], kind="stable")
        positions = positions[order]
        offsets = entries.offsets[positions]
        ends = offsets + entries.sizes[positions]
        path = data_path(self.prefix, shard, self.num_shards)
        url = self.storage.url(path)
        reader = self.storage.open_reader(path)
        try:
            read_into_many = getattr(reader, "read_into_many", None)
            if read_into_many is None:
                return None
            past = np.flatnonzero(ends > reader.size)
            if past.size:
                at = int(positions[past[0]])
                entry = entries.record(at)
                raise CorruptCheckpointError(
                    f"tensor {columns.name(at)!r} (offset {entry.offset}, size {entry.size}) "
                    f"lies past the end of the file ({reader.size} bytes)",
                    path=url,
                )
            kinds = [(shape, dtype_pair(dtype)[0]) for dtype, shape in entries.heads]
            empty = np.empty
            arrays = [empty(*kinds[h]) for h in entries.head_ids[positions].tolist()]
            # Byte views as NumPy arrays, which the garbage collector does not track (a
            # memoryview and its managed buffer are two tracked objects per tensor).
            u8 = np.uint8
            views: list[Any] = [np.frombuffer(a, u8) for a in arrays]
            starts = offsets.tolist()
            for lo, hi in _runs(offsets, ends):
                check_cancelled()
                read_into_many(starts[lo], views[lo:hi])
            if verify:
                count = len(views)
                actual = mask_many(np.fromiter(map(_crc32c, views), dtype=np.uint32, count=count))
                for i in np.flatnonzero(actual != entries.crcs[positions])[:1].tolist():
                    at = int(positions[i])
                    self._decode(columns.name(at), entries.record(at), None, arrays[i], True, url)
        finally:
            reader.close()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return [arrays[i] for i in back.tolist()]

    async def _read_pairs(
        self, pairs: list[tuple[str, EntryRecord]], verify: bool
    ) -> dict[str, np.ndarray]:
        """Read the given entries; the arrays in the order given."""
        plain = [pair for pair in pairs if not pair[1].slices]
        out = {key: array for key, _, array in await self._read_entries(plain, verify)}
        for key, entry in pairs:
            if entry.slices:
                out[key] = await self._assemble(key, None, verify)
        return {key: out[key] for key, _ in pairs}

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        entry = self._entry(key)
        box, squeeze = normalize_index(index, entry.shape)
        if entry.slices:
            return squeeze_axes(await self._assemble(key, box, verify), squeeze)
        if box is None or entry.dtype == DT_STRING:
            [(_, _, array)] = await self._read_entries([(key, entry)], verify)
            if box is not None:
                array = array[tuple(slice(a, b) for a, b in box)]
            return squeeze_axes(array, squeeze)
        array = await anyio.to_thread.run_sync(self._read_box, key, entry, box)
        return squeeze_axes(array, squeeze)

    async def read_slices(
        self, pieces: Mapping[str, Index], *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        """Part of each of several tensors (``{name: index}``, ``index`` as for :meth:`read`;
        None for the whole tensor), as a rank restores its share after a change of world
        size. On a remote store the byte ranges of all of them are read together, one
        :meth:`FileReader.read_ranges_into` per data file, so neighbouring ranges share a
        request (:func:`anyckpt.storage.coalesce`) instead of one request per piece. Whole
        tensors and whole saved slices are checksummed when ``verify``; a part of a tensor or
        slice cannot be (its checksum covers the whole), as with :meth:`read`. Locally each
        piece is read as :meth:`read` reads it."""
        if self.storage.cheap_small_reads:
            out: dict[str, np.ndarray] = {}

            async def one(key: str, index: Index) -> None:
                out[key] = await self.read(key, index, verify=verify)

            await run_concurrently(partial(one, key, index) for key, index in pieces.items())
            return {key: out[key] for key in pieces}
        jobs: dict[int, list[_Job]] = defaultdict(list)

        def job(key: str, entry: EntryRecord, box: list[tuple[int, int]] | None) -> tuple[int, int]:
            items = jobs[entry.shard_id]
            items.append((key, entry, box))
            return entry.shard_id, len(items) - 1

        plans: list[tuple[str, list[int], Any]] = []
        for key, index in pieces.items():
            entry = self._entry(key)
            box, squeeze = normalize_index(index, entry.shape)
            if entry.dtype == DT_STRING:
                plans.append((key, squeeze, None))
            elif not entry.slices:
                full_box = None if box is None else box + [(0, d) for d in entry.shape[len(box) :]]
                plans.append((key, squeeze, job(key, entry, full_box)))
            else:
                want, needed, partial_ = self._plan_assemble(key, box)
                plans.append(
                    (
                        key,
                        squeeze,
                        (
                            want,
                            [(part, job(key, e, None)) for _, e, part in needed],
                            [(dst, job(key, e, rel)) for e, rel, dst in partial_],
                        ),
                    )
                )
        read: dict[int, list[np.ndarray]] = {}

        async def run(shard: int, items: list[_Job]) -> None:
            read[shard] = await anyio.to_thread.run_sync(self._read_pieces, shard, items, verify)

        await run_concurrently(partial(run, shard, items) for shard, items in jobs.items())
        result: dict[str, np.ndarray] = {}
        for key, squeeze, plan in plans:
            if plan is None:  # strings: read whole, as read() does
                result[key] = await self.read(key, pieces[key], verify=verify)
                continue
            if isinstance(plan[0], int):
                shard, i = plan
                result[key] = squeeze_axes(read[shard][i], squeeze)
                continue
            want, needed, partial_ = plan
            entry = self._entry(key)
            full = entry.shape
            out_array = np.empty(tuple(b - a for a, b in want), dtype=dtype_from_enum(entry.dtype))
            for dst, (shard, i) in partial_:
                out_array[dst] = read[shard][i]
            for part, (shard, i) in needed:
                array = read[shard][i]
                pbox = part.box(full)
                if array.shape != tuple(b - a for a, b in pbox):
                    raise self._corrupt(f"slice {part.extents} of {key!r} has shape {array.shape}")
                inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(pbox, want, strict=True)]
                src = tuple(slice(a - p, b - p) for (a, b), (p, _) in zip(inter, pbox, strict=True))
                dst = tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(inter, want, strict=True))
                out_array[dst] = array[src]
            result[key] = squeeze_axes(out_array, squeeze)
        return result

    def _read_pieces(self, shard: int, jobs: list[_Job], verify: bool) -> list[np.ndarray]:
        """Read numeric entries of one data file (worker thread), each whole (box None,
        checksummed if ``verify``) or the box of it (all axes; unverified), with one
        :meth:`FileReader.read_ranges_into`."""
        path = data_path(self.prefix, shard, self.num_shards)
        url = self.storage.url(path)
        reader = self.storage.open_reader(path)
        try:
            for key, entry, _ in jobs:
                if entry.offset + entry.size > reader.size:  # before allocating
                    raise CorruptCheckpointError(
                        f"tensor {key!r} (offset {entry.offset}, size {entry.size}) lies past "
                        f"the end of the file ({reader.size} bytes)",
                        path=url,
                    )
            arrays: list[np.ndarray] = []
            requests: list[tuple[int, memoryview]] = []
            for _, entry, box in jobs:
                disk = disk_dtype(dtype_from_enum(entry.dtype))
                if box is None:
                    array = np.empty(entry.shape, dtype=disk)
                    if array.size:
                        requests.append((entry.offset, byte_view(array)))
                else:
                    array = np.empty(tuple(b - a for a, b in box), dtype=disk)
                    if array.size:
                        requests += _box_requests(entry, box, array)
                arrays.append(array)
            check_cancelled()
            read_ranges_into = getattr(reader, "read_ranges_into", None)
            if not requests:
                pass
            elif read_ranges_into is not None:  # every FileReader; not every wrapper of one
                read_ranges_into(requests)
            else:
                for offset, view in requests:
                    reader.read_into(offset, view)
        finally:
            reader.close()
        out: list[np.ndarray] = []
        for (key, entry, box), array in zip(jobs, arrays, strict=True):
            if box is None:
                out.append(self._decode(key, entry, None, array, verify, url))
            else:
                dtype = dtype_from_enum(entry.dtype)
                out.append(array if array.dtype == dtype else array.astype(dtype))
        return out

    def _read_box(self, key: str, entry: EntryRecord, box: list[tuple[int, int]]) -> np.ndarray:
        """Read only the bytes of a box over the leading axes (no checksum: it covers the whole)."""
        dtype = dtype_from_enum(entry.dtype)
        shape = entry.shape
        full_box = box + [(0, d) for d in shape[len(box) :]]
        out_shape = tuple(b - a for a, b in full_box)
        path = data_path(self.prefix, entry.shard_id, self.num_shards)
        reader = self.storage.open_reader(path)
        try:
            # Before allocating: an entry claiming more bytes than the file holds is corrupt.
            if entry.offset + entry.size > reader.size:
                raise CorruptCheckpointError(
                    f"tensor {key!r} lies past the end of the file", path=self.storage.url(path)
                )
            out = np.empty(out_shape, dtype=disk_dtype(dtype))
            if out.size == 0:
                return out.astype(dtype)
            self._read_box_into(reader, entry, full_box, out)
        finally:
            reader.close()
        return out if out.dtype == dtype else out.astype(dtype)

    @staticmethod
    def _read_box_into(
        reader: FileReader, entry: EntryRecord, full_box: list[tuple[int, int]], out: np.ndarray
    ) -> None:
        for start, view in _box_requests(entry, full_box, out):
            reader.read_into(start, view)

    def _plan_assemble(
        self, key: str, box: list[tuple[int, int]] | None
    ) -> tuple[
        list[tuple[int, int]],
        list[tuple[str, EntryRecord, TensorSlice]],
        list[tuple[EntryRecord, list[tuple[int, int]], tuple[slice, ...]]],
    ]:
        """The box wanted of a partitioned tensor (all axes), the slices to read whole
        (checksummed) and those only part of which is wanted: (entry, box within the slice,
        where it goes in the output)."""
        entry = self._entry(key)
        full = entry.shape
        want = (box or []) + [(0, d) for d in full[len(box or []) :]]
        out_shape = tuple(b - a for a, b in want)
        needed: list[tuple[str, EntryRecord, TensorSlice]] = []
        covered = 0
        for extents in entry.slices:
            part = TensorSlice(extents)
            pbox = part.box(full)
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(pbox, want, strict=True)]
            if all(a < b for a, b in inter) or (math.prod(full) == 0 and not needed):
                needed.append((key, self._slices[key][extents], part))
                covered += math.prod(b - a for a, b in inter)
        if covered != math.prod(out_shape):
            raise self._corrupt(f"the slices of {key!r} do not cover it exactly")
        # A slice only part of which is wanted: only that part's bytes are read (unverified,
        # as any ranged read), e.g. a rank restoring its share after a change of world size.
        partial: list[tuple[EntryRecord, list[tuple[int, int]], tuple[slice, ...]]] = []
        if box is not None and entry.dtype != DT_STRING:
            for item in list(needed):
                _, slice_entry, part = item
                pbox = part.box(full)
                inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(pbox, want, strict=True)]
                if inter == list(pbox) or math.prod(b - a for a, b in inter) == 0:
                    continue
                if slice_entry.shape != tuple(b - a for a, b in pbox):
                    raise self._corrupt(f"slice {part.extents} of {key!r} has the wrong shape")
                rel = [(a - p, b - p) for (a, b), (p, _) in zip(inter, pbox, strict=True)]
                dst = tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(inter, want, strict=True))
                partial.append((slice_entry, rel, dst))
                needed.remove(item)
        return want, needed, partial

    async def _assemble(
        self, key: str, box: list[tuple[int, int]] | None, verify: bool
    ) -> np.ndarray:
        """Put a partitioned tensor (or the box of it asked for) together from its slices."""
        entry = self._entry(key)
        full = entry.shape
        want, needed, partial = self._plan_assemble(key, box)
        dtype = dtype_from_enum(entry.dtype)
        out_shape = tuple(b - a for a, b in want)
        parts = await self._read_entries([(k, e) for k, e, _ in needed], verify)
        pieces: list[tuple[tuple[slice, ...], np.ndarray]] = []
        for slice_entry, rel, dst in partial:
            piece = await anyio.to_thread.run_sync(self._read_box, key, slice_entry, rel)
            pieces.append((dst, piece))
        # Allocated only now that the slices proved to be in their files.
        out = np.empty(out_shape, dtype=dtype)
        for dst, piece in pieces:
            out[dst] = piece
        by_entry = {id(e): arr for _, e, arr in parts}
        for _, slice_entry, part in needed:
            array = by_entry[id(slice_entry)]
            pbox = part.box(full)
            if array.shape != tuple(b - a for a, b in pbox):
                raise self._corrupt(f"slice {part.extents} of {key!r} has shape {array.shape}")
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(pbox, want, strict=True)]
            src = tuple(slice(a - p, b - p) for (a, b), (p, _) in zip(inter, pbox, strict=True))
            dst = tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(inter, want, strict=True))
            out[dst] = array[src]
        return out


_LITTLE_ENDIAN = sys.byteorder == "little"
#: One read of :meth:`V2Reader._read_pieces`: a tensor's name, its entry, and the box of it
#: over all axes (None: the whole entry).
_Job = tuple[str, EntryRecord, list[tuple[int, int]] | None]


def _box_requests(
    entry: EntryRecord, full_box: list[tuple[int, int]], out: np.ndarray
) -> list[tuple[int, memoryview]]:
    """The (file offset, part of ``out``'s bytes) reads that fill ``out`` with the box
    ``full_box`` (all axes) of ``entry``'s row-major bytes: axes from the last that is not
    whole on are read as one contiguous run per index of the axes before it."""
    dtype = out.dtype
    shape = entry.shape
    split = len(shape)
    while split > 0 and full_box[split - 1] == (0, shape[split - 1]):
        split -= 1
    split = max(split - 1, 0)
    strides = [math.prod(shape[i + 1 :]) * dtype.itemsize for i in range(len(shape))]
    run = (full_box[split][1] - full_box[split][0]) * strides[split] if shape else dtype.itemsize
    outer = [range(a, b) for a, b in full_box[:split]]
    dest = byte_view(out)
    requests: list[tuple[int, memoryview]] = []
    at = 0
    for idx in np.ndindex(*(len(r) for r in outer)) if outer else [()]:
        start = entry.offset + sum((outer[i][j]) * strides[i] for i, j in enumerate(idx))
        if shape:
            start += full_box[split][0] * strides[split]
        requests.append((start, dest[at : at + run]))
        at += run
    return requests


def _bytes_of(array: np.ndarray) -> memoryview:
    """A fresh C-contiguous array's bytes (:func:`byte_view`, cheaper for NumPy's dtypes)."""
    buffer: Any = array  # NumPy's stubs do not declare the buffer protocol
    try:
        return memoryview(buffer).cast("B")
    except (TypeError, ValueError):  # zero-size arrays; dtypes NumPy cannot export (bfloat16)
        return byte_view(array)


def _tiles(shape: tuple[int, ...], boxes: list[tuple[tuple[int, int], ...]]) -> bool:
    """Whether ``boxes`` cover a tensor of ``shape`` exactly once (disjoint, no gaps)."""
    if sum(math.prod(b - a for a, b in box) for box in boxes) != math.prod(shape):
        return False
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            if all(max(a, c) < min(b, d) for (a, b), (c, d) in zip(first, second, strict=True)):
                return False
    return True


def _runs(offsets: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of offset-sorted entries (each smaller than
    PARALLEL_BYTES) that lie back to back and span at most GATHER_BYTES, to be read with one
    scatter read each: a new run starts at a gap and whenever the offset enters the next
    half of GATHER_BYTES counted from the start of its stretch of back-to-back entries."""
    n = len(offsets)
    if not n:
        return []
    gap = np.ones(n, dtype=bool)
    gap[1:] = offsets[1:] != ends[:-1]
    stretch = np.cumsum(gap) - 1
    stretch_start = offsets[np.flatnonzero(gap)][stretch]
    half = (offsets - stretch_start) // (GATHER_BYTES // 2)
    new = gap.copy()
    new[1:] |= half[1:] != half[:-1]
    bounds = [*np.flatnonzero(new).tolist(), n]
    return list(pairwise(bounds))


def _coalesce_small(items: list[tuple[str, EntryRecord]]) -> list[list[tuple[str, EntryRecord]]]:
    """Runs of offset-sorted, back-to-back numeric entries (strings stand alone), each run of
    at most GATHER_BYTES, to be read with one scatter read."""
    runs: list[list[tuple[str, EntryRecord]]] = []
    run: list[tuple[str, EntryRecord]] = []
    end = start = -1
    for item in items:
        entry = item[1]
        if entry.dtype == DT_STRING:
            if run:
                runs.append(run)
                run = []
            runs.append([item])
            continue
        if run and entry.offset == end and end + entry.size - start <= GATHER_BYTES:
            run.append(item)
        else:
            if run:
                runs.append(run)
            run = [item]
            start = entry.offset
        end = entry.offset + entry.size
    if run:
        runs.append(run)
    return runs


def _coalesce(
    items: list[tuple[str, EntryRecord]], limit: int
) -> list[list[tuple[str, EntryRecord]]]:
    """Group offset-sorted entries that are back to back into runs of at most ``limit`` bytes."""
    chunks: list[list[tuple[str, EntryRecord]]] = []
    for item in items:
        entry = item[1]
        if chunks:
            last = chunks[-1]
            first, prev = last[0][1], last[-1][1]
            if (
                prev.offset + prev.size == entry.offset
                and entry.offset + entry.size - first.offset <= limit
            ):
                last.append(item)
                continue
        chunks.append([item])
    return chunks


def normalize_index(
    index: Index, shape: tuple[int, ...]
) -> tuple[list[tuple[int, int]] | None, list[int]]:
    """(start, stop) per leading axis, and which of those axes an int index drops."""
    if index is None:
        return None, []
    items = index if isinstance(index, tuple) else (index,)
    if len(items) > len(shape):
        raise IndexError(f"{len(items)} indices for a tensor of rank {len(shape)}")
    box: list[tuple[int, int]] = []
    squeeze: list[int] = []
    for axis, (item, dim) in enumerate(zip(items, shape, strict=False)):
        if isinstance(item, slice):
            start, stop, step = item.indices(dim)
            if step != 1:
                raise IndexError("only step-1 slices are supported")
            box.append((start, max(start, stop)))
        elif isinstance(item, (int, np.integer)):
            i = int(item) + (dim if item < 0 else 0)
            if not 0 <= i < dim:
                raise IndexError(f"index {item} is out of bounds for axis {axis} of size {dim}")
            box.append((i, i + 1))
            squeeze.append(axis)
        else:
            raise TypeError(f"index items must be int or slice, not {type(item).__name__}")
    return box, squeeze


def squeeze_axes(array: np.ndarray, axes: list[int]) -> np.ndarray:
    return array.reshape([d for i, d in enumerate(array.shape) if i not in axes]) if axes else array

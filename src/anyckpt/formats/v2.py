"""TensorFlow's V2 tensor bundle: ``PREFIX.index`` plus ``PREFIX.data-SSSSS-of-NNNNN``.

Writing reproduces TensorFlow's Saver byte for byte: tensors go into the data file in sorted key
order, unpadded, each entry carries the masked CRC-32C of its bytes, and the index is the same
table TensorFlow builds. Numeric tensors are written from their own buffers and read straight
into their destination arrays; checksums run in C without the GIL, one worker thread per shard.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np

from .._concurrency import run_concurrently
from ..codecs.bundle import (
    BundleEntry,
)
from ..codecs.dtypes import (
    enum_from_dtype,
)
from ..codecs.ordered_code import encode_tensor_name_slice
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafePathError
from ..partitioned import partitions_of
from ..storage import Storage
from ..tensors import Reordered, stored_key_order
from . import layout
from .base import FormatBase, FormatOption
from .layout import parse_file_name
from .sharded import SHARD_FORMAT_OPTIONS, ShardOptions, plan_shards, tensor_nbytes
from .v2_data import MANY_TENSORS, DataFileEntries, write_data_file
from .v2_index import build_index
from .v2_index import write_index as write_index_file
from .v2_layout import MAX_INDEX_BYTES, data_path, index_path
from .v2_reader import V2Reader


def read_index(storage: Storage, prefix: str) -> bytes:
    """The bytes of ``PREFIX.index`` (blocking; at most :data:`MAX_INDEX_BYTES`)."""
    return storage.read_bytes(index_path(prefix), max_size=MAX_INDEX_BYTES)


def probe_prefix(storage: Storage, path: str) -> bytes | None:
    """Blocking: the index of the V2 checkpoint whose prefix ``path`` is, or None when
    ``path`` is a file or directory or no ``PREFIX.index`` exists. Exactly the first step of
    :func:`~anyckpt.formats.locate_checkpoint` for a prefix (V2 is the first format tried)
    followed by :meth:`V2Format.open`'s read, in one call: one worker-thread hop where the
    general path takes four."""
    if storage.path_kind(path) != "none" or not storage.exists(index_path(path)):
        return None
    return read_index(storage, path)


class V2Format(FormatBase):
    """The V2 tensor bundle (TensorFlow's default since 1.x)."""

    name = "v2"
    options: Mapping[str, FormatOption] = {
        **SHARD_FORMAT_OPTIONS,
        "data_order": FormatOption(
            (str,), "\"given\": the data file in the mapping's order (TF2's layout), unsharded"
        ),
    }
    has_checksums = True
    tf_saver_version = 2

    async def write(
        self,
        storage: Storage,
        prefix: str,
        tensors: Mapping[str, np.ndarray],
        *,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Write a bundle. Sharding options (``devices``, ``max_shard_bytes``, ``num_shards``
        or ``shard_of``; see :mod:`.sharded`) split it over several data files, written
        concurrently. The index is written last, so a bundle whose index exists is complete.
        ``data_order="given"`` (unsharded) lays the data file out in the mapping's order, as
        TensorFlow 2's object-based saver does; the index is in key order either way.
        A :class:`~anyckpt.Partitioned` tensor is stored as TensorFlow stores a partitioned
        variable: a full-name entry listing the slices, and one entry per slice."""
        opts = ShardOptions.from_options(options)
        keys = tuple(tensors)  # a tuple: stored_key_order keys its cache by it
        values = list(tensors.values())
        sorted_raws, order = stored_key_order(keys)  # bytewise order
        plain = set(map(type, values)) <= {np.ndarray}  # no Partitioned among them
        holders: dict[bytes, BundleEntry] = {}  # full-name entries of partitioned tensors
        groups: dict[int, tuple[Sequence[bytes], Sequence[np.ndarray]]] = {}  # keys, arrays
        shards: list[list[str]] = []
        if plain and not opts.sharded and (options or {}).get("data_order") == "given":
            # TF2's order: the data file holds the tensors as given, the index is sorted.
            raws_given = [b""] * len(keys)
            for raw, i in zip(sorted_raws, order.tolist(), strict=True):
                raws_given[i] = raw
            groups[0] = (raws_given, values)
        elif plain and not opts.sharded:  # the common case: one file, in bytewise key order
            groups[0] = (sorted_raws, Reordered(values, order))  # (no list of them)
        else:
            names = list(map(keys.__getitem__, order.tolist()))
            raws = dict(zip(names, sorted_raws, strict=True))
            sizes = [(k, tensor_nbytes(tensors[k]) if opts.needs_sizes else 0) for k in names]
            shards = plan_shards(sizes, opts)
        del keys, values  # the groups hold what is needed of them
        for shard, shard_keys in enumerate(shards):
            if plain:  # already in key order
                groups[shard] = ([raws[k] for k in shard_keys], [tensors[k] for k in shard_keys])
                continue
            items: list[tuple[bytes, np.ndarray]] = []
            for key in shard_keys:
                raw, array = raws[key], tensors[key]
                parts = partitions_of(array)
                if not parts:
                    items.append((raw, array))
                    continue
                dtype = enum_from_dtype(array.dtype)
                holders[raw] = BundleEntry(dtype, tuple(array.shape), slices=parts)
                base = np.asarray(array)
                for part in parts:
                    piece = base[tuple(slice(start, start + n) for start, n in part)]
                    items.append((encode_tensor_name_slice(raw, part), piece))
            items.sort(key=lambda item: item[0])
            groups[shard] = ([raw for raw, _ in items], [array for _, array in items])
        num_shards = len(groups)
        directory = posixpath.dirname(prefix)
        if directory:
            await anyio.to_thread.run_sync(storage.makedirs, directory)

        paths = [data_path(prefix, i, num_shards) for i in range(num_shards)]
        results: list[DataFileEntries] = []
        # One data file whose entries are known before its data is written: the index is
        # built on a second thread meanwhile (NumPy there, writev here: two cores), unless
        # it has more than MANY_TENSORS: then it is built and written a range at a time after
        # the data, so the whole table never exists at once (10^6 1 KiB tensors: -62 B each).
        index_ready: list[Future[bytes]] = []
        overlap = sum(len(group[0]) for group in groups.values()) <= MANY_TENSORS

        def build_early(entries: DataFileEntries) -> None:
            pool = ThreadPoolExecutor(1, thread_name_prefix="anyckpt-index")
            index_ready.append(pool.submit(build_index, 1, [entries], holders))
            pool.shutdown(wait=False)

        def write_index() -> None:  # off the event loop: a few ms of NumPy
            if index_ready:
                table = index_ready[0].result()
                storage.write_bytes(index_path(prefix), table, durable=durable)
            else:  # built as it is written
                write_index_file(
                    storage, index_path(prefix), num_shards, results, holders, durable=durable
                )

        # One data file: its index is written on its thread, right after it (glibc keeps each
        # thread's freed heap in its own arena: one thread for both phases reuses one).
        single = num_shards == 1
        try:
            await run_concurrently(
                partial(
                    self._write_one_shard,
                    storage,
                    paths[shard],
                    *groups.get(shard, ((), [])),
                    durable,
                    shard,
                    results,
                    build_early if single and overlap else None,
                    write_index if single else None,
                )
                for shard in range(num_shards)
            )
            if not single:
                await anyio.to_thread.run_sync(write_index)
        except BaseException:
            # Remove every data file this save may have renamed into place (a cancellation can
            # land just after a rename, before the task returns).
            with anyio.CancelScope(shield=True):
                for path in paths:
                    with suppress(Exception):  # already failing: clean up what we can
                        await anyio.to_thread.run_sync(storage.remove, path)
            raise
        if durable and directory:
            await anyio.to_thread.run_sync(storage.sync_directory, directory)
        return [*paths, index_path(prefix)]

    @staticmethod
    async def _write_one_shard(
        storage: Storage,
        path: str,
        keys: Sequence[bytes],
        arrays: Sequence[np.ndarray],
        durable: bool,
        shard: int,
        results: list[DataFileEntries],
        early: Callable[[DataFileEntries], None] | None,
        then: Callable[[], None] | None,
    ) -> None:
        """Write one data file in a worker thread, its entries appended to ``results``, then
        call ``then`` (if given) on the same thread, unless cancelled in between."""

        def write() -> None:
            results.append(
                write_data_file(
                    storage,
                    path,
                    keys,
                    arrays,
                    durable,
                    shard,
                    anyio.from_thread.check_cancelled,
                    early,
                )
            )
            if then is not None:
                anyio.from_thread.check_cancelled()
                then()

        await anyio.to_thread.run_sync(write)

    # -- reading ---------------------------------------------------------------------------

    async def detect(self, storage: Storage, prefix: str) -> bool:
        return await anyio.to_thread.run_sync(storage.exists, index_path(prefix))

    async def open(self, storage: Storage, prefix: str) -> V2Reader:
        data = await anyio.to_thread.run_sync(read_index, storage, prefix)
        return V2Reader.from_index(storage, prefix, data)

    async def files(self, storage: Storage, prefix: str) -> list[str]:
        """The index and data files. Shard count from the header when the index is readable;
        otherwise (missing, damaged, a link leaving the directory) the data files found by
        their exact naming pattern."""
        try:
            reader = await self.open(storage, prefix)
        except (CheckpointNotFoundError, CorruptCheckpointError, UnsafePathError):
            directory, base = posixpath.split(prefix)
            names = await anyio.to_thread.run_sync(storage.listdir_prefixed, directory, f"{base}.")
            found = [
                posixpath.join(directory, n)
                for n in names
                if parse_file_name(n) == (base, layout.DATA)
            ]
            if index_path(base) in names:  # (listed: a dangling link too)
                found.append(index_path(prefix))
            return found
        return reader.files()

"""TensorFlow's legacy V1 checkpoint: one sorted table per file, no separate data file.

Files: ``PREFIX`` (unsharded) or ``PREFIX-00000-of-00002``, ``PREFIX-00001-of-00002``...
(sharded; TensorFlow's state file then names the pattern ``PREFIX-?????-of-00002``, and
:meth:`V1Format.open`, ``detect`` and ``files`` accept both that pattern and the bare prefix).
Each file holds its own meta (key ``""``) and one entry per saved slice; see :mod:`..codecs.v1`.

Writing reproduces TensorFlow's bytes. Sharded saves write every shard concurrently, each one
streamed block by block (fixed-width tensors straight from their buffers), under a temporary
name. Shard files are renamed into place once all are written, the last shard last: it is the
commit marker, so ``files()`` lists it last and a reader refuses a checkpoint that lacks any
shard. V1 cannot hold bfloat16, uint32, uint64 or the float8/int4 types.
"""

from __future__ import annotations

import heapq
import math
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np

from .._concurrency import run_concurrently
from ..codecs import DecodeError
from ..codecs import v1 as codec
from ..codecs.dtypes import dtype_from_enum, enum_from_dtype, tf_name, to_little_endian
from ..codecs.ordered_code import encode_tensor_name_slice
from ..codecs.packed import PackedBytes
from ..codecs.table import BLOCK_SIZE, BLOCK_TRAILER_SIZE, FOOTER_SIZE, BlockHandle
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError
from ..partitioned import partitions_of
from ..storage import FileReader, FileWriter, Storage
from ..tensors import Reordered, key_from_bytes, key_to_bytes, stored_key_order
from . import v1_columns
from .base import Extent, FormatBase, Index, ReaderBase, TensorSlice, TensorSpec
from .layout import split_v1_pattern, v1_pattern_path, v1_shard_number, v1_shard_path
from .sharded import SHARD_FORMAT_OPTIONS, ShardOptions, plan_shards, tensor_nbytes
from .v1_tensors import TensorColumnsBuilder, V1Tensor
from .v2_reader import normalize_index, squeeze_axes

Extents = tuple[Extent, ...]
#: Tensors read per step of a full read (what is made per tensor lives for one step).
_READ_CHUNK = 1 << 14
#: Decoded tensors of at most this many bytes are copied out of their block (see _decode).
_COPY_BELOW = 64 << 10
#: Largest index block, and largest meta entry, we agree to load.
MAX_INDEX_BYTES = 1 << 30
#: The meta is read with a block of at most this size; a larger first block is read partly.
_META_BLOCK_READ = 8 << 20


#: The V1 file names (:mod:`.layout`, their one home): ``PREFIX-SSSSS-of-NNNNN`` and the
#: pattern TensorFlow records for a sharded save, ``PREFIX-?????-of-NNNNN``.
shard_path = v1_shard_path
pattern_path = v1_pattern_path


# -- writing -------------------------------------------------------------------------------


@dataclass
class _Item:
    """One tensor to write: its stored name, dtype number, shape and slices with their data."""

    name: bytes
    enum: int
    shape: tuple[int, ...]
    slices: list[tuple[Extents, np.ndarray]]


def _items(tensors: Mapping[str, np.ndarray]) -> dict[str, _Item]:
    items: dict[str, _Item] = {}
    for key, array in tensors.items():
        raw = key_to_bytes(key)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsupportedFormatError(
                f"V1 checkpoints need UTF-8 tensor names; {key!r} is not"
            ) from None
        enum = enum_from_dtype(array.dtype)
        try:
            codec.check_v1_dtype(enum)
        except ValueError as exc:
            raise UnsupportedFormatError(f"tensor {key!r}: {exc}") from None
        parts = partitions_of(array)
        shape = tuple(array.shape)
        if parts:
            base = np.asarray(array)
            slices = [(p, base[tuple(slice(s, s + n) for s, n in p)]) for p in parts]
        else:
            slices = [(codec.whole(len(shape)), np.asarray(array))]
        items[key] = _Item(raw, enum, shape, slices)
    return items


def _write_file(
    storage: Storage,
    path: str,
    items: Sequence[_Item],
    durable: bool,
    check_cancelled: Callable[[], None],
    done: Callable[[FileWriter], None],
) -> None:
    """Stream one V1 table to a temporary file; hand its writer, not yet committed, to
    ``done`` (from this thread: a cancelled caller would lose a return value)."""
    ordered = sorted(items, key=lambda item: item.name)
    meta = codec.encode_meta(
        [codec.MetaTensor(i.name, i.enum, i.shape, tuple(e for e, _ in i.slices)) for i in ordered]
    )
    entries = sorted(
        (encode_tensor_name_slice(item.name, extents), item, extents, array)
        for item in ordered
        for extents, array in item.slices
    )
    table = codec.TableWriter(BLOCK_SIZE)
    writer = storage.open_writer(path, durable=durable)
    try:
        for chunk in table.add(codec.META_KEY, [meta]):
            writer.write(chunk)
        for key, item, extents, array in entries:
            check_cancelled()
            data = array if array.dtype == object else to_little_endian(array)
            try:
                _, value = codec.encode_slice_entry(item.name, extents, data, item.enum)
            except ValueError as exc:
                raise UnsupportedFormatError(str(exc), path=storage.url(path)) from None
            for chunk in table.add(key, value):
                writer.write(chunk)
        for chunk in table.finish():
            writer.write(chunk)
        done(writer)
    except BaseException:
        writer.abort()
        raise


def _column_plan(
    tensors: Mapping[str, np.ndarray], opts: ShardOptions
) -> v1_columns.ColumnPlan | None:
    """The plan to write these tensors column-wise (:mod:`.v1_columns`), or None when the
    streaming writer is needed (a :class:`~anyckpt.Partitioned` tensor, a large tensor...)."""
    values = list(tensors.values())
    if not set(map(type, values)) <= {np.ndarray}:
        return None
    groups: list[tuple[PackedBytes, Sequence[np.ndarray]]]
    if not opts.sharded:
        names, order = stored_key_order(tuple(tensors))
        groups = [(names, Reordered(values, order))]
    else:
        keyed = sorted(tensors, key=key_to_bytes)
        sizes = [(k, tensor_nbytes(tensors[k]) if opts.needs_sizes else 0) for k in keyed]
        groups = [
            (
                PackedBytes.join(map(key_to_bytes, keys), len(keys), increasing=True),
                [tensors[k] for k in keys],
            )
            for keys in plan_shards(sizes, opts)
        ]
    return v1_columns.plan(groups)


class V1Format(FormatBase):
    """TensorFlow's V1 checkpoint (``TensorSliceWriter`` / ``TensorSliceReader``)."""

    name = "v1"
    options = SHARD_FORMAT_OPTIONS
    has_checksums = True
    tf_saver_version = 1

    async def write(
        self,
        storage: Storage,
        prefix: str,
        tensors: Mapping[str, np.ndarray],
        *,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Write one file ``prefix``, or, with any sharding option (``devices``,
        ``max_shard_bytes``, ``num_shards``, ``shard_of``; see :mod:`.sharded`), files
        ``prefix-0000i-of-0000N`` written concurrently. Returns the paths in commit order."""
        opts = ShardOptions.from_options(options)
        columns = _column_plan(tensors, opts)
        if columns is not None:
            count = len(columns.files)
            paths = [shard_path(prefix, i, count) for i in range(count)]
            if not opts.sharded:
                paths = [prefix]
            write_file: Callable[..., None] = partial(v1_columns.write_file, columns=columns)
            files: list[Any] = columns.files
        else:
            items = _items(tensors)
            keyed = sorted(items, key=key_to_bytes)
            sizes = [
                (k, sum(tensor_nbytes(a) for _, a in items[k].slices) if opts.needs_sizes else 0)
                for k in keyed
            ]
            shards = plan_shards(sizes, opts)
            if opts.sharded:
                paths = [shard_path(prefix, i, len(shards)) for i in range(len(shards))]
            else:
                paths = [prefix]
            write_file = _write_file
            files = [[items[k] for k in shard] for shard in shards]
            del items, keyed, sizes, shards
        directory = posixpath.dirname(prefix)
        if directory:
            await anyio.to_thread.run_sync(storage.makedirs, directory)

        writers: dict[int, FileWriter] = {}
        committed: list[str] = []

        async def write_one(i: int) -> None:
            file, files[i] = files[i], None  # (its columns or items freed once written)
            await anyio.to_thread.run_sync(
                write_file,
                storage,
                paths[i],
                file,
                durable,
                anyio.from_thread.check_cancelled,
                partial(writers.__setitem__, i),
            )

        async def commit(i: int) -> None:
            # Recorded as committed before, and forgotten as a writer only after: whenever a
            # cancellation lands, the cleanup below sees the file under one name or the other.
            committed.append(paths[i])
            await anyio.to_thread.run_sync(writers[i].commit)
            del writers[i]

        try:
            await run_concurrently(partial(write_one, i) for i in range(len(paths)))
            # Every shard is written: rename them into place, the commit marker (last) last.
            await run_concurrently(partial(commit, i) for i in range(len(paths) - 1))
            await commit(len(paths) - 1)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for writer in writers.values():
                    with suppress(Exception):  # already failing: clean up what we can
                        await anyio.to_thread.run_sync(writer.abort)
                for path in committed:
                    with suppress(Exception):
                        await anyio.to_thread.run_sync(storage.remove, path)
            raise
        if durable and directory:
            await anyio.to_thread.run_sync(storage.sync_directory, directory)
        return paths

    # -- locating files ----------------------------------------------------------------------

    def checkpoint_path(self, prefix: str, written: Sequence[str]) -> str:
        """The path the ``checkpoint`` state file records for a save that wrote ``written``:
        TensorFlow's ``PREFIX-?????-of-0000N`` pattern for a sharded save, else ``prefix``."""
        if len(written) == 1 and written[0] == prefix:
            return prefix
        return pattern_path(prefix, len(written))

    async def _candidates(self, storage: Storage, prefix: str) -> list[str]:
        """The files a checkpoint at ``prefix`` consists of (whether they exist or not)."""
        pattern = split_v1_pattern(prefix)
        if pattern:
            base, count = pattern
            return [shard_path(base, i, count) for i in range(count)]
        if await anyio.to_thread.run_sync(_is_file, storage, prefix):
            return [prefix]
        counts = {count for _, count in await _shards_present(storage, prefix)}
        if not counts:
            return []
        # Several shard counts (leftovers of other saves): the one whose marker exists.
        complete = [
            n
            for n in sorted(counts)
            if await anyio.to_thread.run_sync(storage.exists, shard_path(prefix, n - 1, n))
        ]
        count = complete[-1] if complete else max(counts)
        return [shard_path(prefix, i, count) for i in range(count)]

    async def detect(self, storage: Storage, prefix: str) -> bool:
        """A V1 file at ``prefix`` (checked by its table magic), or the commit marker (last
        shard) of a sharded one."""
        files = await self._candidates(storage, prefix)
        if not files:
            return False
        if len(files) == 1 and files[0] == prefix:
            return await anyio.to_thread.run_sync(_has_table_magic, storage, prefix)
        return await anyio.to_thread.run_sync(storage.exists, files[-1])

    async def files(self, storage: Storage, prefix: str) -> list[str]:
        """The existing files of the checkpoint, commit marker last."""
        pattern = split_v1_pattern(prefix)
        if not pattern and await anyio.to_thread.run_sync(_is_file, storage, prefix):
            return [prefix]
        base, only = pattern if pattern else (prefix, None)
        present = await _shards_present(storage, base)
        return [
            shard_path(base, i, n)
            for n, i in sorted((n, i) for i, n in present)
            if only is None or n == only
        ]

    async def open(self, storage: Storage, prefix: str) -> V1Reader:
        paths = await self._candidates(storage, prefix)
        if not paths:
            raise CheckpointNotFoundError("no V1 checkpoint", path=storage.url(prefix))
        if len(paths) > 1:
            exists = [await anyio.to_thread.run_sync(storage.exists, p) for p in paths]
            if not any(exists):
                raise CheckpointNotFoundError("no V1 checkpoint", path=storage.url(prefix))
            missing = [p for p, e in zip(paths, exists, strict=True) if not e]
            if missing:
                raise CorruptCheckpointError(
                    f"incomplete sharded checkpoint: {len(missing)} of {len(paths)} shard files "
                    f"missing, e.g. {posixpath.basename(missing[0])}",
                    path=storage.url(prefix),
                )
        results: dict[int, _File] = {}

        async def load(i: int, path: str) -> None:
            results[i] = await anyio.to_thread.run_sync(_load_file, storage, path)

        await run_concurrently(partial(load, i, path) for i, path in enumerate(paths))
        files = [results[i] for i in range(len(paths))]
        return await anyio.to_thread.run_sync(V1Reader, storage, prefix, files)


def _is_file(storage: Storage, path: str) -> bool:
    return storage.isfile(path)


def _has_table_magic(storage: Storage, path: str) -> bool:
    try:
        reader = storage.open_reader(path)
    except (CheckpointNotFoundError, OSError):
        return False
    try:
        if reader.size < FOOTER_SIZE:
            return False
        try:
            codec.decode_footer(reader.read(reader.size - FOOTER_SIZE, FOOTER_SIZE))
        except DecodeError:
            return False
        return True
    finally:
        reader.close()


async def _shards_present(storage: Storage, base: str) -> list[tuple[int, int]]:
    """(shard, count) of every ``base-SSSSS-of-NNNNN`` file that exists."""
    directory, name = posixpath.split(base)
    names = await anyio.to_thread.run_sync(storage.listdir_prefixed, directory or ".", f"{name}-")
    found = []
    for n in names:
        number = v1_shard_number(n, name)
        if number is not None and number[0] < number[1]:
            found.append(number)
    return found


# -- reading -------------------------------------------------------------------------------


@dataclass
class _File:
    """One opened V1 file: its block index and its meta."""

    path: str
    url: str
    size: int
    separators: list[bytes]
    handles: list[BlockHandle]
    meta: bytes | memoryview | None  # the meta's bytes, until the reader has taken it in


def _load_file(storage: Storage, path: str) -> _File:
    """Read a V1 file's footer, index block and meta (worker thread)."""
    url = storage.url(path)
    reader = storage.open_reader(path)
    try:
        try:
            size = reader.size
            if size < FOOTER_SIZE:
                raise DecodeError(f"file too short for a table ({size} bytes)")
            index_handle = codec.decode_footer(reader.read(size - FOOTER_SIZE, FOOTER_SIZE))
            codec.check_handle(index_handle, size, "index")
            if index_handle.size > MAX_INDEX_BYTES:
                raise DecodeError(f"index block of {index_handle.size} bytes is absurd")
            index = codec.check_block(
                reader.read(index_handle.offset, index_handle.size + BLOCK_TRAILER_SIZE),
                index_handle.offset,
            )
            separators: list[bytes] = []
            handles: list[BlockHandle] = []
            for key, value in codec.block_entries(index):
                handle, end = BlockHandle.decode(bytes(value))
                if end != len(value):
                    raise DecodeError("index entry has trailing bytes")
                codec.check_handle(handle, size, "data")
                if handles and handle.offset < handles[-1].offset + handles[-1].size:
                    raise DecodeError("data blocks overlap or are out of order")
                separators.append(key)
                handles.append(handle)
            if not handles:
                raise DecodeError("table has no data block (V1 files always hold a meta)")
            meta = _read_meta(reader, handles[0])
        except DecodeError as exc:
            raise CorruptCheckpointError(str(exc), path=url) from None
    finally:
        reader.close()
    return _File(path, url, size, separators, handles, meta)


def _read_meta(reader: FileReader, first: BlockHandle) -> bytes | memoryview:
    """The value of key ``""``: the first entry of the first block. A small block is read
    whole and checked; of a large one (a big tensor shares it) only the entry is read."""
    if first.size <= _META_BLOCK_READ:
        raw = reader.read(first.offset, first.size + BLOCK_TRAILER_SIZE)
        entries = codec.block_entries(codec.check_block(raw, first.offset))
        if not entries or entries[0][0] != codec.META_KEY:
            raise DecodeError("the first table entry is not the meta (key '')")
        return entries[0][1]
    head = reader.read(first.offset, min(32, first.size))
    key, value_len, value_at = codec.first_entry_header(head)
    if key != codec.META_KEY:
        raise DecodeError("the first table entry is not the meta (key '')")
    if value_at + value_len > first.size or value_len > MAX_INDEX_BYTES:
        raise DecodeError(f"meta entry of {value_len} bytes does not fit its block")
    return reader.read(first.offset + value_at, value_len)


def _check_dtype(key: str, enum: int, prefix: str) -> None:
    try:
        codec.check_v1_dtype(enum)
    except ValueError as exc:
        raise UnsupportedFormatError(f"tensor {key!r}: {exc}", path=prefix) from None


def _box(extents: Extents, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(0, d) if n == -1 else (s, s + n) for (s, n), d in zip(extents, shape, strict=True)]


class V1Reader(ReaderBase):
    """An open V1 checkpoint: the merged meta of its files (as columns, see
    :mod:`.v1_tensors`); slices read block by block."""

    def __init__(self, storage: Storage, prefix: str, files: list[_File]) -> None:
        self.storage = storage
        self.prefix = prefix
        self._files = files
        builder = TensorColumnsBuilder(self._merge)
        for index, f in enumerate(files):
            try:
                builder.add_file(index, self._checked(index, codec.iter_meta(f.meta or b"")))
            except DecodeError as exc:
                raise CorruptCheckpointError(str(exc), path=f.url) from None
            f.meta = None
        self._columns = builder.build()
        self._others = builder.others
        self._validate()

    def _corrupt(self, message: str, file: int | None = None) -> CorruptCheckpointError:
        where = self._files[file].url if file is not None else self.storage.url(self.prefix)
        return CorruptCheckpointError(message, path=where)

    def _checked(self, index: int, metas: Iterator[codec.MetaTensor]) -> Iterator[codec.MetaTensor]:
        """Each tensor of a file's meta, its dtype and slices checked against the file."""
        f = self._files[index]
        for meta in metas:
            dtype_from_enum(meta.dtype, path=f.url)
            for extents in meta.slices:
                volume = math.prod(codec.slice_shape(extents, meta.shape))
                if volume > f.size:  # every element takes at least a byte
                    raise self._corrupt(
                        f"slice {extents} of {key_from_bytes(meta.name)!r} cannot fit the file",
                        index,
                    )
            yield meta

    def _merge(
        self, key: str, tensor: V1Tensor | None, meta: codec.MetaTensor, index: int
    ) -> V1Tensor:
        if tensor is None:
            tensor = V1Tensor(meta.dtype, meta.shape)
        if (tensor.enum, tensor.shape) != (meta.dtype, meta.shape):
            raise self._corrupt(
                f"{key!r} is {tf_name(meta.dtype)}{list(meta.shape)} here but "
                f"{tf_name(tensor.enum)}{list(tensor.shape)} in another file",
                index,
            )
        tensor.slices.extend((extents, index) for extents in meta.slices)
        return tensor

    def _validate(self) -> None:
        """Stored slices must not overlap (only tensors stored in several slices can)."""
        for key, tensor in self._others.items():
            boxes = [_box(e, tensor.shape) for e, _ in tensor.slices]
            for i, a in enumerate(boxes):
                for b in boxes[:i]:
                    inter = [min(y, w) - max(x, v) for (x, y), (v, w) in zip(a, b, strict=True)]
                    if all(n > 0 for n in inter):
                        raise self._corrupt(f"stored slices of {key!r} overlap")

    # -- metadata --------------------------------------------------------------------------

    def keys(self) -> list[str]:
        names = self._columns.names()
        if not self._others:
            return list(names)
        return list(heapq.merge(names, sorted(self._others, key=key_to_bytes), key=key_to_bytes))

    def _tensor(self, key: str) -> V1Tensor:
        tensor = self._others.get(key) if self._others else None
        if tensor is not None:
            return tensor
        row = self._columns.row(key)
        if row is None:
            raise KeyError(f"{key!r} is not in checkpoint {self.prefix}")
        return self._columns.tensor(row)

    def spec(self, key: str) -> TensorSpec:
        tensor = self._tensor(key)
        parts = () if tensor.whole else tuple(TensorSlice(e) for e, _ in tensor.slices)
        return TensorSpec(dtype_from_enum(tensor.enum), tensor.shape, parts)

    def files(self) -> list[str]:
        return [f.path for f in self._files]

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> V1Reader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- data ------------------------------------------------------------------------------

    def _read_file_slices(
        self, index: int, wanted: list[tuple[str, V1Tensor, Extents]], verify: bool
    ) -> dict[tuple[str, Extents], np.ndarray]:
        """Decode the given slices of one file, each block read once (worker thread)."""
        f = self._files[index]
        by_block: dict[int, list[tuple[str, V1Tensor, Extents, bytes]]] = defaultdict(list)
        for key, tensor, extents in wanted:
            raw_key = encode_tensor_name_slice(key_to_bytes(key), extents)
            block = codec.find_block(f.separators, raw_key)
            if block is None:
                raise self._corrupt(f"slice {extents} of {key!r} has no entry", index)
            by_block[block].append((key, tensor, extents, raw_key))
        out: dict[tuple[str, Extents], np.ndarray] = {}
        reader = self.storage.open_reader(f.path)
        try:
            for block in sorted(by_block):
                anyio.from_thread.check_cancelled()
                handle = f.handles[block]
                raw = bytearray(handle.size + BLOCK_TRAILER_SIZE)
                reader.read_into(handle.offset, raw)
                try:
                    entries = dict(
                        codec.block_entries(codec.check_block(raw, handle.offset, verify=verify))
                    )
                    for key, tensor, extents, raw_key in by_block[block]:
                        value = entries.get(raw_key)
                        if value is None:
                            raise DecodeError(f"slice {extents} of {key!r} has no entry")
                        out[(key, extents)] = self._decode(key, tensor, extents, value)
                except DecodeError as exc:
                    raise self._corrupt(str(exc), index) from None
        finally:
            reader.close()
        return out

    @staticmethod
    def _decode(key: str, tensor: V1Tensor, extents: Extents, value: memoryview) -> np.ndarray:
        data = codec.decode_slice_entry(value)
        if data.name != key_to_bytes(key) or data.extents != extents:
            raise DecodeError(
                f"entry of {key!r} {extents} holds {data.name!r} {data.extents} instead"
            )
        shape = codec.slice_shape(extents, tensor.shape)
        try:
            flat = codec.decode_tensor_proto(data.tensor, tensor.enum, math.prod(shape))
        except DecodeError as exc:
            raise DecodeError(f"tensor {key!r}: {exc}") from None
        dtype = dtype_from_enum(tensor.enum)
        if flat.dtype != dtype or not flat.flags.aligned:
            flat = flat.astype(dtype)  # native byte order, and no view of the block buffer
        elif flat.base is not None and flat.nbytes <= _COPY_BELOW:
            # A small tensor is copied out of its block: a view would keep the whole block
            # alive, and its base (a memoryview, which the garbage collector tracks) too: a
            # full read of 10^6 tiny tensors made every full collection walk all of them.
            flat = flat.copy()
        return flat.reshape(shape)

    async def _read_slices(
        self, wanted: list[tuple[str, V1Tensor, Extents, int]], verify: bool
    ) -> dict[tuple[str, Extents], np.ndarray]:
        checked: set[int] = set()
        for key, tensor, _, _ in wanted:
            if tensor.enum not in checked:
                _check_dtype(key, tensor.enum, self.prefix)
                checked.add(tensor.enum)
        by_file: dict[int, list[tuple[str, V1Tensor, Extents]]] = defaultdict(list)
        for key, tensor, extents, index in wanted:
            by_file[index].append((key, tensor, extents))
        results: dict[tuple[str, Extents], np.ndarray] = {}

        async def run(index: int, items: list[tuple[str, V1Tensor, Extents]]) -> None:
            results.update(
                await anyio.to_thread.run_sync(self._read_file_slices, index, items, verify)
            )

        await run_concurrently(partial(run, index, items) for index, items in by_file.items())
        return results

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        """The tensors ``keys`` (all by default), read :data:`_READ_CHUNK` tensors at a time
        (what is made per tensor besides its array lives for one chunk)."""
        names = self.keys() if keys is None else list(keys)
        out: dict[str, np.ndarray] = {}
        for lo in range(0, len(names), _READ_CHUNK):
            tensors = {key: self._tensor(key) for key in names[lo : lo + _READ_CHUNK]}
            wanted = [(k, t, e, i) for k, t in tensors.items() for e, i in t.slices]
            slices = await self._read_slices(wanted, verify)
            del wanted
            for key, tensor in tensors.items():
                out[key] = self._assemble(key, tensor, None, slices)
        return {key: out[key] for key in names} if len(out) != len(names) else out

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        tensor = self._tensor(key)
        box, squeeze = normalize_index(index, tensor.shape)
        want = (box or []) + [(0, d) for d in tensor.shape[len(box or []) :]]
        needed = [
            (key, tensor, e, i)
            for e, i in tensor.slices
            if all(
                max(a, c) < min(b, d)
                for (a, b), (c, d) in zip(_box(e, tensor.shape), want, strict=True)
            )
            or math.prod(tensor.shape) == 0
        ]
        slices = await self._read_slices(needed, verify)
        return squeeze_axes(self._assemble(key, tensor, box, slices), squeeze)

    def _assemble(
        self,
        key: str,
        tensor: V1Tensor,
        box: list[tuple[int, int]] | None,
        slices: Mapping[tuple[str, Extents], np.ndarray],
    ) -> np.ndarray:
        """The tensor (or the box of it asked for) from its decoded slices."""
        if box is None and tensor.whole:
            return slices[(key, tensor.slices[0][0])]
        full = tensor.shape
        want = (box or []) + [(0, d) for d in full[len(box or []) :]]
        out = np.empty(tuple(b - a for a, b in want), dtype=dtype_from_enum(tensor.enum))
        covered = 0
        for extents, _ in tensor.slices:
            array = slices.get((key, extents))
            if array is None:
                continue
            pbox = _box(extents, full)
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(pbox, want, strict=True)]
            if not all(a < b for a, b in inter):
                continue
            src = tuple(slice(a - p, b - p) for (a, b), (p, _) in zip(inter, pbox, strict=True))
            dst = tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(inter, want, strict=True))
            out[dst] = array[src]
            covered += math.prod(b - a for a, b in inter)
        if covered != out.size:
            raise self._corrupt(f"the stored slices of {key!r} do not cover what was asked")
        return out

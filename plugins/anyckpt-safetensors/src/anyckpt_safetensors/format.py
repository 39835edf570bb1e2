"""The safetensors format behind anyckpt's :class:`~anyckpt.CheckpointFormat` interface.

A checkpoint at ``PREFIX`` is the one file ``PREFIX.safetensors`` (or ``PREFIX`` itself when it
already ends in ``.safetensors``), written atomically. Strings and complex128 have no safetensors
dtype and are refused. Partitioned tensors are stored whole; their partitions are kept in the
metadata (``anyckpt.partitions``) and come back in :attr:`~anyckpt.TensorSpec.partitions`.
safetensors has no checksums, so ``verify`` has nothing to check.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np

from anyckpt.codecs.dtypes import LITTLE_ENDIAN_HOST, disk_dtype, to_little_endian
from anyckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError
from anyckpt.formats.base import (
    FormatBase,
    FormatOption,
    Index,
    ReaderBase,
    TensorSlice,
    TensorSpec,
)
from anyckpt.partitioned import partitions_of
from anyckpt.storage import Storage

from . import codec

SUFFIX = ".safetensors"
PARTITIONS_KEY = "anyckpt.partitions"
#: Tensor bytes read per ``read_ranges_into`` batch (bounds what a remote read holds at once).
_BATCH_BYTES = 64 << 20
#: ... and at most this many ranges per batch: a range's view lives for one batch, not for a
#: whole read of a million tiny tensors.
_BATCH_TENSORS = 1 << 14


def file_path(prefix: str) -> str:
    return prefix if prefix.endswith(SUFFIX) else prefix + SUFFIX


def byte_view(array: np.ndarray) -> memoryview:
    return array.reshape(-1).view(np.uint8).data


#: Tensors of at most this many bytes are copied together into one buffer per write, up to
#: :data:`_GATHER_BYTES` or :data:`_GATHER_TENSORS` of them (one write per tiny tensor cost
#: a system call each; a buffer exported from each array, NumPy's cached record on it).
_SMALL_BYTES = 64 << 10
_GATHER_BYTES = 1 << 20
_GATHER_TENSORS = 1 << 12


def _data(tensors: Mapping[str, np.ndarray], order: list[str]) -> Iterator[memoryview]:
    """The data buffer, in ``order``: each large tensor's bytes as they are, runs of small
    ones of one dtype concatenated (little-endian, C order)."""
    run: list[np.ndarray] = []
    pending = 0
    dtype: np.dtype | None = None
    for key in order:
        array = np.asarray(tensors[key])
        size = array.nbytes
        if not size:
            continue
        if array.dtype.byteorder == ">" or (
            array.dtype.byteorder == "=" and not LITTLE_ENDIAN_HOST
        ):
            array = to_little_endian(array)
        if run and (
            size > _SMALL_BYTES
            or array.dtype != dtype
            or pending + size > _GATHER_BYTES
            or len(run) >= _GATHER_TENSORS
        ):
            yield np.concatenate(run, axis=None).view(np.uint8).data
            run, pending = [], 0
        if size > _SMALL_BYTES:
            yield byte_view(to_little_endian(array))
            continue
        run.append(array)
        pending += size
        dtype = array.dtype
    if run:
        yield np.concatenate(run, axis=None).view(np.uint8).data


class SafetensorsFormat(FormatBase):
    """safetensors (``PREFIX.safetensors``). Options: ``metadata``, a ``{str: str}`` mapping
    stored in the header's ``__metadata__``."""

    name = "safetensors"
    options: Mapping[str, FormatOption] = {
        "metadata": FormatOption((Mapping,), "{str: str} stored in the header's __metadata__"),
    }
    #: safetensors stores no checksums: ``verify`` checks the structure only.
    has_checksums = False

    async def write(
        self,
        storage: Storage,
        prefix: str,
        tensors: Mapping[str, np.ndarray],
        *,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        metadata = dict((options or {}).get("metadata") or {})
        groups: dict[int, list[str]] = {}  # dtype rank: names
        ranks: dict[np.dtype, int] = {}
        partitions: dict[str, list[list[list[int]]]] = {}
        for key, array in tensors.items():
            dtype = array.dtype
            rank = ranks.get(dtype)
            if rank is None and dtype.kind == "O":
                raise UnsupportedFormatError(
                    f"tensor {key!r} is a string tensor, and safetensors has no string dtype "
                    f"(leave it out: anyckpt convert ... --exclude {key!r})"
                )
            try:
                if not key.isascii():
                    key.encode("utf-8")
                if rank is None:
                    rank = ranks[dtype] = codec.rank(codec.dtype_code(dtype))
            except UnicodeEncodeError:
                raise UnsupportedFormatError(
                    f"safetensors needs UTF-8 names; {key!r} is not"
                ) from None
            except ValueError as exc:
                raise UnsupportedFormatError(f"tensor {key!r}: {exc}") from None
            group = groups.get(rank)
            if group is None:
                group = groups[rank] = []
            group.append(key)
            parts = partitions_of(array)
            if parts:
                partitions[key] = [[list(e) for e in part] for part in parts]
        if partitions:
            metadata[PARTITIONS_KEY] = json.dumps(partitions, separators=(",", ":"))
        try:
            checked = codec.checked_metadata(metadata)
            if codec.METADATA_KEY in tensors:
                raise ValueError(f"{codec.METADATA_KEY!r} is reserved in safetensors")
        except (TypeError, ValueError) as exc:
            raise UnsupportedFormatError(str(exc)) from None
        order = codec.ordered(groups)
        path = file_path(prefix)
        directory = posixpath.dirname(path)

        def spec(key: str) -> tuple[np.dtype, tuple[int, ...]]:
            array = tensors[key]
            return array.dtype, array.shape

        def write() -> None:
            # The header is made twice, a piece at a time: once for its length (which comes
            # first), once to write it; never whole in memory (~95 bytes per tiny tensor).
            size = sum(map(len, codec.header_pieces(order, spec, checked)))
            if directory:
                storage.makedirs(directory)
            writer = storage.open_writer(path, durable=durable)
            try:
                writer.write(codec.header_head(size))
                written = 0
                for piece in codec.header_pieces(order, spec, checked):
                    writer.write(piece)
                    written += len(piece)
                if written != size:
                    raise RuntimeError("the tensors changed while they were saved")
                writer.write(b" " * codec.header_padding(size))
                for data in _data(tensors, order):
                    anyio.from_thread.check_cancelled()
                    writer.write(data)
                writer.commit()
            except BaseException:
                writer.abort()
                raise

        await anyio.to_thread.run_sync(write)
        if durable and directory:
            await anyio.to_thread.run_sync(storage.sync_directory, directory)
        return [path]

    async def detect(self, storage: Storage, prefix: str) -> bool:
        """``PREFIX.safetensors`` exists and starts like a safetensors file."""

        def check() -> bool:
            try:
                reader = storage.open_reader(file_path(prefix))
            except (CheckpointNotFoundError, OSError):
                return False
            try:
                if reader.size < 10:
                    return False
                first = reader.read(0, 9)
                codec.header_length(first[:8], reader.size)
                return first[8:9] == b"{"
            except (codec.HeaderError, CorruptCheckpointError):
                return False
            finally:
                reader.close()

        return await anyio.to_thread.run_sync(check)

    async def files(self, storage: Storage, prefix: str) -> list[str]:
        path = file_path(prefix)
        return [path] if await anyio.to_thread.run_sync(storage.exists, path) else []

    async def open(self, storage: Storage, prefix: str) -> SafetensorsReader:
        path = file_path(prefix)

        def load() -> codec.Header:
            reader = storage.open_reader(path)
            try:
                n = codec.header_length(reader.read(0, min(8, reader.size)), reader.size)
                return codec.decode_header(reader.read(8, n), reader.size)
            except codec.HeaderError as exc:
                raise CorruptCheckpointError(str(exc), path=storage.url(path)) from None
            finally:
                reader.close()

        header = await anyio.to_thread.run_sync(load)
        return SafetensorsReader(storage, prefix, path, header)


class SafetensorsReader(ReaderBase):
    """An open safetensors file: the parsed header; tensors read by byte range."""

    def __init__(self, storage: Storage, prefix: str, path: str, header: codec.Header) -> None:
        self.storage = storage
        self.prefix = prefix
        self.path = path
        self.header = header
        #: The header's ``__metadata__`` (None when absent).
        self.metadata = header.metadata
        self._partitions = self._parse_partitions()

    def _parse_partitions(self) -> dict[str, tuple[TensorSlice, ...]]:
        raw = (self.metadata or {}).get(PARTITIONS_KEY)
        if raw is None:
            return {}
        try:
            parsed = json.loads(raw)
            return {
                key: tuple(TensorSlice(tuple((int(s), int(n)) for s, n in p)) for p in parts)
                for key, parts in parsed.items()
                if key in self.header.entries
            }
        except (ValueError, TypeError, AttributeError):
            return {}  # informational only: a foreign or damaged value is ignored

    def keys(self) -> list[str]:
        return self.header.entries.keys_in_order()  # the columns are in byte order

    def _entry(self, key: str) -> codec.Entry:
        try:
            return self.header.entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in checkpoint {self.prefix}") from None

    def spec(self, key: str) -> TensorSpec:
        entry = self._entry(key)
        return TensorSpec(
            codec.DTYPES[entry.dtype], entry.shape, self._partitions.get(key, ()), entry.nbytes
        )

    def files(self) -> list[str]:
        return [self.path]

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> SafetensorsReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _plan(
        self, entry: codec.Entry, rows: tuple[int, int] | None
    ) -> tuple[int, np.ndarray, np.dtype]:
        """Where a tensor's bytes (or ``rows`` of it) start, and the array they go into."""
        dtype = codec.DTYPES[entry.dtype]
        shape = entry.shape
        begin = self.header.data_start + entry.begin
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        return begin, np.empty(shape, dtype=disk_dtype(dtype)), dtype

    def _read_all(
        self, keys: Sequence[str], rows: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        """Read every tensor straight into its result array, a batch of up to
        :data:`_BATCH_BYTES` at a time through ``read_ranges_into`` (``preadv`` locally;
        concurrent requests remotely, nearby ranges merged: a few round trips, not one per
        tensor)."""
        reader = self.storage.open_reader(self.path)
        try:
            out: dict[str, np.ndarray] = {}
            batch: list[tuple[int, memoryview]] = []
            pending = 0
            converts: list[tuple[str, np.dtype]] = []
            for key in keys:  # each entry made once, here (the columns hold the header)
                begin, array, dtype = self._plan(self._entry(key), rows)
                out[key] = array
                if array.dtype != dtype:
                    converts.append((key, dtype))
                if not array.nbytes:
                    continue
                if batch and (
                    pending + array.nbytes > _BATCH_BYTES or len(batch) >= _BATCH_TENSORS
                ):
                    anyio.from_thread.check_cancelled()
                    reader.read_ranges_into(batch)
                    batch, pending = [], 0
                batch.append((begin, byte_view(array)))
                pending += array.nbytes
            if batch:
                anyio.from_thread.check_cancelled()
                reader.read_ranges_into(batch)
            for key, dtype in converts:
                if out[key].dtype != dtype:
                    out[key] = out[key].astype(dtype)
            return out
        finally:
            reader.close()

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        names = self.keys() if keys is None else list(keys)
        for key in names:
            if key not in self.header.entries:
                self._entry(key)  # the KeyError naming the checkpoint
        return await anyio.to_thread.run_sync(self._read_all, names)

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        entry = self._entry(key)
        if index is None:
            return (await self.read_many([key]))[key]
        probe = np.broadcast_to(np.empty((), np.uint8), entry.shape)[index]  # validates index
        items = index if isinstance(index, tuple) else (index,)
        first = items[0] if items else slice(None)
        if isinstance(first, slice):
            start, stop, step = first.indices(entry.shape[0])
            if step != 1:
                raise IndexError("only step-1 slices are supported")
            rows = (start, max(start, stop))
            rest: tuple[Any, ...] = (slice(None), *items[1:])
        else:
            i = int(first) + (entry.shape[0] if first < 0 else 0)
            rows = (i, i + 1)
            rest = (0, *items[1:])

        out = (await anyio.to_thread.run_sync(self._read_all, [key], rows))[key][rest]
        assert out.shape == probe.shape
        return np.ascontiguousarray(out)

"""The zstd container behind anyckpt's :class:`~anyckpt.CheckpointFormat` interface.

``PREFIX.zckpt`` is one file, written atomically: chunk frames as they are compressed, then the
header, then the footer (see :mod:`.codec`). Compression and decompression run on a pool of
``threads`` worker threads (zstd releases the GIL), writing in order with a bounded number of
chunks in flight. Every chunk is checked against its crc32c when read (unless ``verify=False``).

Options for ``write``: ``level`` (zstd level, default 3; negative levels are the fast modes),
``threads`` (default: the CPU count, at most 8), ``chunk_bytes`` (default 4 MiB), ``shuffle``
(default True: byte-transpose numeric chunks before compressing), ``max_ratio`` (default
:data:`.codec.DEFAULT_MAX_RATIO`: chunks that compress better are padded up to it).

Reading decompresses each chunk as a stream, in pieces of :data:`PIECE_BYTES`, straight into the
caller's array (a shuffled chunk's byte planes are scattered into it as they come), so memory is
the tensors asked for plus a constant; only a chunk cut by a partial read is decompressed into a
scratch buffer of its own size (its checksum covers all of it). A chunk may not claim more than
``max_ratio`` raw bytes per stored byte (``ZstdFormat(max_ratio=...)`` raises the limit for a
trusted file: ``anyckpt.register_format(ZstdFormat(max_ratio=1 << 15))``), nor a zstd window
over 2^:data:`.codec.MAX_WINDOW_LOG`.
"""

from __future__ import annotations

import math
import os
import posixpath
import threading
from array import array as Array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import numpy as np
import zstandard

from anyckpt.codecs.crc import crc32c
from anyckpt.codecs.dtypes import (
    DT_STRING,
    disk_dtype,
    dtype_from_enum,
    enum_from_dtype,
    to_little_endian,
)
from anyckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidOptionError
from anyckpt.formats.base import (
    FormatBase,
    FormatOption,
    Index,
    ReaderBase,
    TensorSlice,
    TensorSpec,
)
from anyckpt.partitioned import partitions_of
from anyckpt.storage import FileReader, Storage

from . import codec

SUFFIX = ".zckpt"
DEFAULT_LEVEL = 3
DEFAULT_CHUNK = 4 << 20
#: Decompressed bytes produced per step when a chunk is scattered or read partially.
PIECE_BYTES = 256 << 10


def file_path(prefix: str) -> str:
    return prefix if prefix.endswith(SUFFIX) else prefix + SUFFIX


def _threads(value: Any) -> int:
    n = int(value) if value is not None else min(os.cpu_count() or 1, 8)
    if n < 1:
        raise InvalidOptionError("threads must be at least 1")
    return n


#: Frames fetched per batch of reads (compressed bytes held at once).
_BATCH_BYTES = 64 << 20
#: ... and at most this many tensors per batch: what is made per tensor (its TensorInfo, its
#: frame's view) lives for one batch, not for a whole read of a million tiny tensors.
_BATCH_TENSORS = 1 << 14
#: A tensor of one chunk of at most this many raw bytes is decompressed in the reading thread,
#: not on the pool: waking a pool thread and waiting for it took ~150 us per tensor on a loaded
#: 2-core machine, most of a full read of 10^5 tiny tensors.
_INLINE_BYTES = 64 << 10


def _windows(wanted: list[tuple[int, codec.Chunk]]) -> Iterator[list[tuple[int, codec.Chunk]]]:
    """``wanted`` in runs of at most :data:`_BATCH_BYTES` compressed bytes (at least one)."""
    run: list[tuple[int, codec.Chunk]] = []
    size = 0
    for item in wanted:
        if run and size + item[1].size > _BATCH_BYTES:
            yield run
            run, size = [], 0
        run.append(item)
        size += item[1].size
    if run:
        yield run


class _IO:
    """One file reader and decompression pool, and frames fetched ahead (by offset)."""

    def __init__(self, reader: FileReader, pool: ThreadPoolExecutor) -> None:
        self.reader = reader
        self.pool = pool
        self.cache: dict[int, memoryview] = {}

    def prefetch(self, chunks: list[codec.Chunk]) -> None:
        views = self.reader.read_ranges([(c.offset, c.size) for c in chunks])
        self.cache.update((c.offset, v) for c, v in zip(chunks, views, strict=True))

    def frames(self, window: list[tuple[int, codec.Chunk]]) -> dict[int, memoryview]:
        missing = [c for _, c in window if c.offset not in self.cache]
        if not missing:
            return self.cache
        views = self.reader.read_ranges([(c.offset, c.size) for c in missing])
        return {**self.cache, **{c.offset: v for c, v in zip(missing, views, strict=True)}}


class _Local(threading.local):
    compressor: zstandard.ZstdCompressor | None = None
    decompressor: zstandard.ZstdDecompressor | None = None


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterator[Any], window: int
) -> Iterator[Any]:
    """``pool.map`` with at most ``window`` results in flight (bounded memory)."""
    pending: deque[Future[Any]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class ZstdFormat(FormatBase):
    """A zstd-compressed, chunked container (``PREFIX.zckpt``)."""

    name = "zstd"
    options: Mapping[str, FormatOption] = {
        "level": FormatOption((int,), f"zstd level (default {DEFAULT_LEVEL}; negative: fast)"),
        "threads": FormatOption((int,), "compression threads (default: CPUs, at most 8)"),
        "chunk_bytes": FormatOption((int,), "bytes per compressed chunk (default 4 MiB)"),
        "shuffle": FormatOption((bool,), "byte-transpose numeric chunks (default true)"),
        "max_ratio": FormatOption(
            (int,), "raw bytes per stored byte a chunk may reach (default 1,024; readers opt in)"
        ),
    }
    #: Every chunk carries the crc32c of its uncompressed bytes.
    has_checksums = True

    def __init__(self, *, max_ratio: int = codec.DEFAULT_MAX_RATIO) -> None:
        self.max_ratio = _ratio(max_ratio)

    async def write(
        self,
        storage: Storage,
        prefix: str,
        tensors: Mapping[str, np.ndarray],
        *,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        options = options or {}
        level = int(options.get("level", DEFAULT_LEVEL))
        threads = _threads(options.get("threads"))
        chunk_bytes = int(options.get("chunk_bytes", DEFAULT_CHUNK))
        do_shuffle = bool(options.get("shuffle", True))
        max_ratio = _ratio(options.get("max_ratio", codec.DEFAULT_MAX_RATIO))
        if not 1 <= chunk_bytes <= codec.MAX_CHUNK_BYTES:
            raise InvalidOptionError(f"chunk_bytes must be 1..{codec.MAX_CHUNK_BYTES}")
        if not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise InvalidOptionError(
                f"zstd level {level} is out of range (-131072..{zstandard.MAX_COMPRESSION_LEVEL})"
            )
        path = file_path(prefix)
        directory = posixpath.dirname(path)
        local = _Local()

        def compress(job: list[tuple[np.ndarray, int]]) -> list[tuple[bytes, int, int]]:
            if local.compressor is None:
                local.compressor = _compressor(level, chunk_bytes)
            out = []
            for piece, itemsize in job:
                crc = crc32c(piece.data)
                data = codec.shuffle(piece, itemsize) if itemsize > 1 else piece
                frame = local.compressor.compress(data.data)
                out.append(
                    (frame + codec.padding(len(frame), piece.nbytes, max_ratio), piece.nbytes, crc)
                )
            return out

        def write() -> list[str]:
            if directory:
                storage.makedirs(directory)
            keys = sorted(tensors)
            chunks = _ChunkColumns()
            writer = storage.open_writer(path, durable=durable)
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="anyckpt-zstd") as pool:
                    jobs = _jobs(tensors, keys, chunk_bytes, do_shuffle, chunks.tensor_ends)
                    for frames in _ordered_map(pool, compress, jobs, 2 * threads):
                        anyio.from_thread.check_cancelled()
                        chunks.add(frames)
                        writer.write_many([memoryview(frame) for frame, _, _ in frames])
                        del frames
                offset = chunks.end
                crc = size = 0
                for piece in codec.header_pieces(
                    level, _entries(tensors, keys, chunks, do_shuffle)
                ):
                    writer.write(piece)
                    crc = crc32c(piece, crc)
                    size += len(piece)
                writer.write(codec.FOOTER.pack(codec.MAGIC, offset, size, crc, codec.VERSION))
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            return [path]

        written = await anyio.to_thread.run_sync(write)
        if durable and directory:
            await anyio.to_thread.run_sync(storage.sync_directory, directory)
        return written

    async def detect(self, storage: Storage, prefix: str) -> bool:
        def check() -> bool:
            try:
                reader = storage.open_reader(file_path(prefix))
            except (CheckpointNotFoundError, OSError):
                return False
            try:
                if reader.size < codec.FOOTER_SIZE:
                    return False
                footer = reader.read(reader.size - codec.FOOTER_SIZE, codec.FOOTER_SIZE)
                return footer[:8] == codec.MAGIC
            finally:
                reader.close()

        return await anyio.to_thread.run_sync(check)

    async def files(self, storage: Storage, prefix: str) -> list[str]:
        path = file_path(prefix)
        return [path] if await anyio.to_thread.run_sync(storage.exists, path) else []

    async def open(self, storage: Storage, prefix: str) -> ZstdReader:
        path = file_path(prefix)
        url = storage.url(path)

        def load() -> tuple[int, codec.TensorTable]:
            reader = storage.open_reader(path)
            try:
                size = reader.size
                if size < codec.FOOTER_SIZE:
                    raise codec.ContainerError(f"file too short ({size} bytes)")
                footer = reader.read(size - codec.FOOTER_SIZE, codec.FOOTER_SIZE)
                offset, length, crc = codec.decode_footer(footer, size)
                return codec.decode_header_from(reader.read, offset, length, crc, self.max_ratio)
            except codec.ContainerError as exc:
                raise CorruptCheckpointError(str(exc), path=url) from None
            finally:
                reader.close()

        level, tensors = await anyio.to_thread.run_sync(load)
        return ZstdReader(storage, prefix, path, level, tensors)


def _ratio(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_ratio must be a positive integer, not {value!r}")
    return value


def _compressor(level: int, chunk_bytes: int) -> zstandard.ZstdCompressor:
    """A compressor at ``level`` whose window stays within ``codec.MAX_WINDOW_LOG``."""
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=chunk_bytes)
    if params.window_log <= codec.MAX_WINDOW_LOG:
        return zstandard.ZstdCompressor(level=level, write_content_size=True)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=chunk_bytes, window_log=codec.MAX_WINDOW_LOG, write_content_size=1
    )
    return zstandard.ZstdCompressor(compression_params=params)


def _layout(array: np.ndarray, do_shuffle: bool) -> str:
    if array.dtype == object:
        return "strings"
    return "shuffle" if do_shuffle and array.dtype.itemsize > 1 else "raw"


#: Chunks of at most this many raw bytes are compressed together, up to :data:`_JOB_BYTES` or
#: :data:`_JOB_CHUNKS` of them per pool task (a task per tiny tensor cost more than the work).
_SMALL_CHUNK = 64 << 10
_JOB_BYTES = 1 << 20
_JOB_CHUNKS = 512


def _jobs(
    tensors: Mapping[str, np.ndarray],
    keys: list[str],
    chunk_bytes: int,
    do_shuffle: bool,
    tensor_ends: Array[int],
) -> Iterator[list[tuple[np.ndarray, int]]]:
    """The chunks of ``keys``' tensors in order, as pool tasks (a large chunk alone, small
    ones together); records where each tensor's chunks end in ``tensor_ends``."""
    job: list[tuple[np.ndarray, int]] = []
    pending = 0
    count = 0
    for key in keys:
        array = tensors[key]
        raw = _tensor_bytes(array)
        itemsize = 1 if array.dtype == object else array.dtype.itemsize
        by = itemsize if _layout(array, do_shuffle) == "shuffle" else 1
        for start, stop in codec.chunk_spans(raw.nbytes, itemsize, chunk_bytes):
            count += 1
            if stop - start > _SMALL_CHUNK:
                if job:
                    yield job
                    job, pending = [], 0
                yield [(raw[start:stop], by)]
                continue
            job.append((raw[start:stop], by))
            pending += stop - start
            if pending >= _JOB_BYTES or len(job) >= _JOB_CHUNKS:
                yield job
                job, pending = [], 0
        tensor_ends.append(count)
    if job:
        yield job


class _ChunkColumns:
    """The chunks written, as columns: offset, stored size, raw size, crc32c; and where each
    tensor's chunks end (``tensor_ends``, in key order). About 28 bytes per one-chunk
    tensor, where a :class:`.codec.Chunk` in a list per tensor took ~300."""

    def __init__(self) -> None:
        self.offsets = Array("q")
        self.sizes = Array("I")  # a frame of at most 1 GiB, plus its padding
        self.raw_sizes = Array("I")  # at most codec.MAX_CHUNK_BYTES
        self.crcs = Array("I")
        self.tensor_ends = Array("q", [0])
        self.end = 0  # bytes of frames written

    def add(self, frames: list[tuple[bytes, int, int]]) -> None:
        for frame, raw_size, crc in frames:
            self.offsets.append(self.end)
            self.sizes.append(len(frame))
            self.raw_sizes.append(raw_size)
            self.crcs.append(crc)
            self.end += len(frame)

    def of(self, tensor: int) -> list[tuple[int, int, int, int]]:
        """Tensor ``tensor``'s chunks (by position in key order)."""
        lo, hi = self.tensor_ends[tensor], self.tensor_ends[tensor + 1]
        return [
            (self.offsets[i], self.sizes[i], self.raw_sizes[i], self.crcs[i]) for i in range(lo, hi)
        ]


def _entries(
    tensors: Mapping[str, np.ndarray], keys: list[str], chunks: _ChunkColumns, do_shuffle: bool
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each tensor's header entry, made as the header is written (not all at once)."""
    enums: dict[np.dtype, int] = {}
    for i, key in enumerate(keys):
        array = tensors[key]
        dtype = array.dtype
        enum = enums.get(dtype)
        if enum is None:
            enum = enums[dtype] = enum_from_dtype(dtype)
        yield (
            key,
            codec.entry_json(
                enum, array.shape, _layout(array, do_shuffle), chunks.of(i), partitions_of(array)
            ),
        )


def _tensor_bytes(array: np.ndarray) -> np.ndarray:
    """A tensor's stored bytes, as uint8 (numeric: a view, no copy)."""
    if array.dtype == object:
        data = codec.encode_strings(array.reshape(-1).tolist())
        return np.frombuffer(data, dtype=np.uint8)
    raw: np.ndarray = to_little_endian(np.asarray(array)).reshape(-1).view(np.uint8)
    return raw


def _fill(stream: Any, target: memoryview) -> None:
    """Decompress exactly ``len(target)`` bytes from ``stream`` into ``target``."""
    at = 0
    while at < len(target):
        n = stream.readinto(target[at : at + PIECE_BYTES])
        if not n:
            raise EOFError
        at += n


def _scatter_planes(stream: Any, target: memoryview, itemsize: int) -> None:
    """Undo :func:`.codec.shuffle` while decompressing: the stream holds byte 0 of every
    element, then byte 1...; each piece goes straight to its column of ``target``."""
    columns = np.frombuffer(target, np.uint8).reshape(-1, itemsize)
    piece = memoryview(bytearray(min(PIECE_BYTES, len(columns)) or 1))
    for plane in range(itemsize):
        at = 0
        while at < len(columns):
            n = stream.readinto(piece[: len(columns) - at])
            if not n:
                raise EOFError
            columns[at : at + n, plane] = np.frombuffer(piece, np.uint8, n)
            at += n


class ZstdReader(ReaderBase):
    """An open ``.zckpt``: its header; tensors decompressed chunk by chunk on demand."""

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        path: str,
        level: int,
        tensors: codec.TensorTable,
        threads: int | None = None,
    ) -> None:
        self.storage = storage
        self.prefix = prefix
        self.path = path
        self.level = level
        self._tensors = tensors
        self._threads = _threads(threads)
        self._local = _Local()
        self._url = storage.url(path)

    def keys(self) -> list[str]:
        return self._tensors.keys_in_order()  # the columns are in byte order

    def _info(self, key: str) -> codec.TensorInfo:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in checkpoint {self.prefix}") from None

    def spec(self, key: str) -> TensorSpec:
        info = self._info(key)
        parts = tuple(TensorSlice(p) for p in info.partitions)
        return TensorSpec(
            dtype_from_enum(info.dtype),
            info.shape,
            parts,
            info.stored_size,
            {"raw_bytes": info.raw_size, "chunks": len(info.chunks)},
        )

    def files(self) -> list[str]:
        return [self.path]

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> ZstdReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- data ------------------------------------------------------------------------------

    def _decompress(
        self,
        frame: memoryview,
        chunk: codec.Chunk,
        itemsize: int,
        verify: bool,
        dest: memoryview,
        skip: int,
    ) -> None:
        """Decompress ``chunk`` (its ``frame``) and put its raw bytes ``[skip, skip +
        len(dest))`` into ``dest``: straight into it for a whole chunk, through a scratch chunk
        otherwise."""
        try:
            content = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(f"bad zstd frame: {exc}", path=self._url) from None
        if content != chunk.raw_size:
            raise CorruptCheckpointError(
                f"zstd frame at {chunk.offset} holds {content} bytes, the header says "
                f"{chunk.raw_size}",
                path=self._url,
            )
        whole = skip == 0 and len(dest) == chunk.raw_size
        target = dest if whole else memoryview(bytearray(chunk.raw_size))
        if self._local.decompressor is None:
            self._local.decompressor = zstandard.ZstdDecompressor(
                max_window_size=1 << codec.MAX_WINDOW_LOG
            )
        try:
            stream = self._local.decompressor.stream_reader(frame, read_across_frames=False)
            if itemsize > 1:
                _scatter_planes(stream, target, itemsize)
            else:
                _fill(stream, target)
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(
                f"zstd frame at {chunk.offset}: {exc}", path=self._url
            ) from None
        except EOFError:
            raise CorruptCheckpointError(
                f"frame at {chunk.offset} is short", path=self._url
            ) from None
        if verify and crc32c(target) != chunk.crc:
            raise CorruptCheckpointError(
                f"chunk at offset {chunk.offset}: checksum mismatch", path=self._url
            )
        if not whole:
            dest[:] = target[skip : skip + len(dest)]

    def _chunks(
        self, info: codec.TensorInfo, start: int, stop: int
    ) -> list[tuple[int, codec.Chunk]]:
        """The chunks holding bytes [start, stop) of a tensor's raw data, with their bases."""
        wanted: list[tuple[int, codec.Chunk]] = []
        at = 0
        for chunk in info.chunks:
            if at < stop and at + chunk.raw_size > start:
                wanted.append((at, chunk))
            at += chunk.raw_size
        return wanted

    def _read_bytes(
        self,
        io: _IO,
        info: codec.TensorInfo,
        start: int,
        stop: int,
        verify: bool,
        out: memoryview | None,
    ) -> memoryview | None:
        """Bytes [start, stop) of a tensor's raw data (into ``out`` when given). The frames
        are fetched in batches (``read_ranges``: concurrent, coalesced requests remotely)
        unless ``io`` already holds them, and decompressed on the pool straight into place."""
        dtype = dtype_from_enum(info.dtype)
        itemsize = dtype.itemsize if info.layout == "shuffle" else 1
        buffer = out if out is not None else memoryview(bytearray(stop - start))
        for window in _windows(self._chunks(info, start, stop)):
            frames = io.frames(window)

            def one(item: tuple[int, codec.Chunk], frames: dict[int, memoryview] = frames) -> None:
                base, chunk = item
                lo, hi = max(start, base), min(stop, base + chunk.raw_size)
                dest = buffer[lo - start : hi - start]
                self._decompress(frames[chunk.offset], chunk, itemsize, verify, dest, lo - base)

            if len(window) == 1 and window[0][1].raw_size <= _INLINE_BYTES:
                one(window[0])  # a small tensor: handing it to the pool costs more
                continue
            for _ in _ordered_map(io.pool, one, iter(window), 2 * self._threads):
                anyio.from_thread.check_cancelled()
        return None if out is not None else buffer

    def _read(
        self,
        io: _IO,
        key: str,
        info: codec.TensorInfo,
        rows: tuple[int, int] | None,
        verify: bool,
    ) -> np.ndarray:
        dtype = dtype_from_enum(info.dtype)
        if info.dtype == DT_STRING:
            data = self._read_bytes(io, info, 0, info.raw_size, verify, None)
            assert data is not None
            try:
                values = codec.decode_strings(data, math.prod(info.shape))
            except codec.ContainerError as exc:
                raise CorruptCheckpointError(f"{key!r}: {exc}", path=self._url) from None
            flat = np.empty(len(values), dtype=object)
            flat[:] = values
            strings: np.ndarray = flat.reshape(info.shape)
            return strings if rows is None else strings[rows[0] : rows[1]]
        shape = info.shape
        start, stop = 0, info.raw_size
        if rows is not None:
            row = math.prod(shape[1:]) * dtype.itemsize
            start, stop = rows[0] * row, rows[1] * row
            shape = (rows[1] - rows[0], *shape[1:])
        array = np.empty(shape, dtype=disk_dtype(dtype))
        if array.nbytes:
            self._read_bytes(io, info, start, stop, verify, array.reshape(-1).view(np.uint8).data)
        return array if array.dtype == dtype else array.astype(dtype)

    def _run(self, keys: list[str], rows: tuple[int, int] | None, verify: bool) -> list[np.ndarray]:
        """Read ``keys`` (``rows`` of each, or all) through one file reader and one pool; the
        frames of many small tensors are fetched together, a batch at a time."""
        reader = self.storage.open_reader(self.path)
        try:
            with ThreadPoolExecutor(self._threads, thread_name_prefix="anyckpt-zstd") as pool:
                io = _IO(reader, pool)
                out: list[np.ndarray] = []
                batch: list[tuple[str, codec.TensorInfo]] = []
                pending = 0

                def flush() -> None:
                    if len(batch) > 1:  # small tensors: all their frames in one batch
                        io.prefetch(
                            [c for _, i in batch for _, c in self._chunks(i, 0, i.raw_size)]
                        )
                    out.extend(self._read(io, k, i, rows, verify) for k, i in batch)
                    io.cache.clear()
                    batch.clear()

                for key in keys:  # each TensorInfo made once, here (the columns hold the header)
                    info = self._info(key)
                    size = info.stored_size
                    if batch and (pending + size > _BATCH_BYTES or len(batch) >= _BATCH_TENSORS):
                        flush()
                        pending = 0
                    batch.append((key, info))
                    pending += size
                flush()
                return out
        finally:
            reader.close()

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        names = self.keys() if keys is None else list(keys)
        for key in names:
            if key not in self._tensors:
                self._info(key)  # the KeyError naming the checkpoint
        arrays = await anyio.to_thread.run_sync(self._run, names, None, verify)
        return dict(zip(names, arrays, strict=True))

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        info = self._info(key)
        if index is None:
            return (await anyio.to_thread.run_sync(self._run, [key], None, verify))[0]
        probe = np.broadcast_to(np.empty((), np.uint8), info.shape)[index]  # validates index
        items = index if isinstance(index, tuple) else (index,)
        first = items[0] if items else slice(None)
        if isinstance(first, slice):
            begin, end, step = first.indices(info.shape[0])
            if step != 1:
                raise IndexError("only step-1 slices are supported")
            rows = (begin, max(begin, end))
            rest: tuple[Any, ...] = (slice(None), *items[1:])
        else:
            i = int(first) + (info.shape[0] if first < 0 else 0)
            rows = (i, i + 1)
            rest = (0, *items[1:])
        array = (await anyio.to_thread.run_sync(self._run, [key], rows, verify))[0]
        out = array[rest]
        assert out.shape == probe.shape
        return np.ascontiguousarray(out)

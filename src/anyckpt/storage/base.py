"""What every storage backend shares: the reader and writer protocols (with the optional
capabilities declared and given defaults), the backend interface, and small helpers."""

from __future__ import annotations

import errno
import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from ..errors import CheckpointNotFoundError, ConcurrentWriterError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .retry import RetryPolicy

#: Marker in the names of files being written; what is left of a crash carries it.
TEMP_MARKER = ".anyckpt-tmp-"

T = TypeVar("T")

#: Size in bytes of a memoryview or NumPy array (both have ``nbytes``).
NBYTES = operator.attrgetter("nbytes")


def bytes_view(buffer: Buffer) -> memoryview:
    """A flat byte view of a C-contiguous buffer (ValueError for any other)."""
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


@dataclass(frozen=True)
class Upload:
    """An unfinished multipart upload (see :meth:`Storage.list_uploads`)."""

    path: str  # of the object it would create
    upload_id: str
    initiated: float | None  # seconds since the epoch
    size: int  # bytes of the parts uploaded so far


@dataclass(frozen=True)
class FileStat:
    """A file of a directory listing: its name, size and modification time (None where the
    store does not say)."""

    name: str
    size: int | None
    mtime: float | None


class FileWriter(Protocol):
    """A file being written; nothing is visible under its name before :meth:`commit`.

    The buffers given to :meth:`write` must not change until :meth:`commit` or :meth:`abort`
    returns: a remote writer may keep them and send them from there.

    Capabilities (every writer of :class:`~anyckpt.storage.Storage` has them; a writer made
    elsewhere gets them from :class:`WriterBase`): :meth:`write_many` writes buffers back to
    back (locally one ``writev`` per IOV_MAX of them), :meth:`reserve` reserves the blocks of
    bytes about to be written (locally ``fallocate``; elsewhere nothing)."""

    path: str

    def write(self, data: Buffer) -> None: ...
    def write_many(self, buffers: Sequence[Buffer]) -> None: ...
    def reserve(self, offset: int, length: int) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class WriterBase:
    """Defaults of a :class:`FileWriter`'s capabilities: :meth:`write_many` writes each
    (non-empty) buffer in turn, :meth:`reserve` does nothing."""

    def write(self, data: Buffer) -> None:
        raise NotImplementedError

    def write_many(self, buffers: Sequence[Buffer]) -> None:
        for buffer in buffers:
            if memoryview(buffer).nbytes:  # (an empty array's view may not be castable)
                self.write(buffer)

    def reserve(self, offset: int, length: int) -> None:
        """Reserve room for ``length`` bytes at ``offset`` where the store can; never needed."""


class FileReader(Protocol):
    """Random access to one file of known size (``size``; there is no seek or tell: every
    read names its offset). Reads past the end raise CorruptCheckpointError.

    :meth:`read_ranges` and :meth:`read_ranges_into` read many ranges at once: locally with
    ``preadv``, remotely in concurrent requests, nearby ranges merged into one (gaps under
    :data:`COALESCE_GAP`), so a format reading many tensors pays for a few round trips, not
    one per tensor. :meth:`read_into_many` fills buffers from consecutive bytes (locally one
    ``preadv`` per IOV_MAX of them; elsewhere one request). A reader is a context manager
    that closes itself (from :class:`ReaderBase`)."""

    path: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def read_into(self, offset: int, buffer: Buffer) -> None: ...
    def read_into_many(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]: ...
    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None: ...
    def close(self) -> None: ...


_R = TypeVar("_R", bound="ReaderBase")


class ReaderBase:
    """Defaults of a :class:`FileReader`'s derived methods, from :meth:`read_ranges_into`:
    :meth:`read_ranges`, :meth:`read_into_many`, and ``with reader:``."""

    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        views = views_for(ranges)
        self.read_ranges_into([(o, v) for (o, _), v in zip(ranges, views, strict=True)])
        return views

    def read_into_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        requests: list[tuple[int, Buffer]] = []
        for view in buffers:
            requests.append((offset, view))
            offset += view.nbytes
        self.read_ranges_into(requests)

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Remote ranged reads: ranges this close are fetched in one request (the gap is discarded)...
COALESCE_GAP = 1 << 20
#: ...as long as the request stays under this size.
COALESCE_LIMIT = 64 << 20


def coalesce(
    ranges: Sequence[tuple[int, int]], *, gap: int = COALESCE_GAP, limit: int = COALESCE_LIMIT
) -> list[tuple[int, int, list[int]]]:
    """Merge byte ranges ``(offset, length)`` into requests ``(start, end, members)``: ranges
    at most ``gap`` bytes apart share a request unless it would exceed ``limit`` bytes (a
    single larger range is its own request). ``members`` are indices into ``ranges``."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    groups: list[tuple[int, int, list[int]]] = []
    for i in order:
        offset, length = ranges[i]
        end = offset + length
        if groups:
            start, stop, members = groups[-1]
            if end <= stop or (offset - stop <= gap and max(stop, end) - start <= limit):
                groups[-1] = (start, max(stop, end), [*members, i])
                continue
        groups.append((offset, end, [i]))
    return groups


def views_for(ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
    """Byte views over one new buffer, one per range (what :meth:`read_ranges` fills)."""
    for offset, length in ranges:
        if length < 0 or offset < 0:
            raise ValueError(f"bad range ({offset}, {length})")
    whole = memoryview(bytearray(sum(length for _, length in ranges)))
    views, at = [], 0
    for _, length in ranges:
        views.append(whole[at : at + length])
        at += length
    return views


@contextmanager
def not_found_as_ours(path: str) -> Iterator[None]:
    """Raise a missing file (or a file where a directory of its path should be) as
    :class:`~anyckpt.errors.CheckpointNotFoundError` naming ``path``."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file", path=path) from None
    except NotADirectoryError:  # a file where a directory of the path should be
        raise CheckpointNotFoundError("no such file (a file is in its path)", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise CheckpointNotFoundError("no such file", path=path) from None
        raise


def content_version(data: Buffer) -> str:
    """The version token of a file on a store without native versions: its content's hash."""
    return "sha256:" + hashlib.sha256(bytes_view(data)).hexdigest()


def conflict(path: str, what: str) -> ConcurrentWriterError:
    """The error of a conditional operation whose file another writer changed."""
    return ConcurrentWriterError(f"{what}: another writer changed it", path=path)


#: What :meth:`Backend.path_kind` answers.
PathKind = Literal["file", "dir", "none"]


class Backend:
    """One kind of store, chosen once by :class:`~anyckpt.storage.Storage` (which delegates
    every operation to it): :class:`~anyckpt.storage.local.LocalBackend`,
    :class:`~anyckpt.storage.fsspec_backend.FsspecBackend` (any fsspec filesystem),
    :class:`~anyckpt.storage.s3.S3Backend`, :class:`~anyckpt.storage.gcs.GCSBackend`. The
    capability attributes say what callers may rely on; their meanings are on the facade."""

    #: Reads of small ranges cost a system call, not a round trip (read, do not merge).
    cheap_small_reads = False
    #: Paths are plain local file names: each is its own URL.
    plain_paths = False
    #: Files are on a local file system where a lock file can be ``flock``-ed.
    supports_flock = False
    #: create_exclusive, replace_if and remove_if are atomic against other processes.
    atomic_conditional_writes = False

    def __init__(self, fs: Any, retry: RetryPolicy, allow_symlinks: bool) -> None:
        self.fs = fs
        self.retry = retry
        self.allow_symlinks = allow_symlinks

    def normalize(self, path: str) -> str:
        """The path as this store names it (local: absolute)."""
        return path

    def url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def retrying(self, op: Callable[[], T], what: str) -> T:
        """``op()``, retried after transient failures as :attr:`retry` says."""
        return self.retry.run(op, what, self.fs)

    # Every operation below is documented on the facade (:class:`~anyckpt.storage.Storage`).
    def open_writer(self, path: str, durable: bool) -> FileWriter:
        raise NotImplementedError

    def write_bytes(self, path: str, data: Buffer, durable: bool) -> None:
        def write() -> None:
            writer = self.open_writer(path, durable)
            try:
                writer.write(data)
                writer.commit()
            except BaseException:
                writer.abort()
                raise

        self.retrying(write, f"writing {self.url(path)}")

    def write_pieces(self, path: str, pieces: Iterable[Buffer], durable: bool) -> None:
        """Joined first: a retried write writes the whole again (see :class:`Storage`)."""
        self.write_bytes(path, b"".join(pieces), durable)

    def makedirs(self, path: str) -> None:
        self.retrying(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}")

    def sync_directory(self, path: str) -> None:
        pass

    def check_replaceable(self, path: str) -> None:
        pass

    def remove(self, path: str) -> bool:
        raise NotImplementedError

    def open_reader(self, path: str) -> FileReader:
        raise NotImplementedError

    def read_bytes(self, path: str, max_size: int | None) -> bytes:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def isfile(self, path: str) -> bool:
        raise NotImplementedError

    def path_kind(self, path: str) -> PathKind:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def listdir(self, path: str) -> list[str]:
        raise NotImplementedError

    def list_files(self, root: str) -> list[FileStat] | None:
        raise NotImplementedError

    def subdirectories(self, root: str) -> list[str]:
        raise NotImplementedError

    def read_versioned(self, path: str, max_size: int | None) -> tuple[bytes, str]:
        raise NotImplementedError

    def create_exclusive(self, path: str, data: bytes, durable: bool) -> str:
        raise NotImplementedError

    def replace_if(self, path: str, data: bytes, version: str, durable: bool) -> str:
        raise NotImplementedError

    def remove_if(self, path: str, version: str) -> None:
        raise NotImplementedError

    def list_uploads(self, directory: str) -> list[Upload]:
        return []

    def abort_upload(self, upload: Upload) -> bool:
        return False

    def check_version(self, path: str, version: str, what: str) -> None:
        """ConcurrentWriterError unless ``path`` holds content of ``version`` (a hash)."""
        try:
            current = content_version(self.read_bytes(path, None))
        except CheckpointNotFoundError:
            raise conflict(self.url(path), what) from None
        if current != version:
            raise conflict(self.url(path), what)

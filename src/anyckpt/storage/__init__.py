"""The one package that touches files: fsspec filesystems, with a fast path for local disk.

Everything here is synchronous and thread-safe; the async layers above call it from worker
threads (``anyio.to_thread``), one thread per shard, so writes, reads and CRCs (which release
the GIL) run concurrently. Remote filesystems (s3fs, gcsfs) run their own event loop in
fsspec's I/O thread, which keeps this usable under both asyncio and trio.

:class:`Storage` is a facade over one backend, chosen once from the filesystem when it is
made: :mod:`.local` (local disk), :mod:`.s3` (s3fs), :mod:`.gcs` (gcsfs) or
:mod:`.fsspec_backend` (any other fsspec filesystem, memory:// included). Its methods
delegate; what callers may rely on is said by capabilities (:attr:`Storage.cheap_small_reads`,
:attr:`Storage.plain_paths`, :attr:`Storage.supports_flock`,
:attr:`Storage.atomic_conditional_writes`, and the optional members of :class:`FileReader`
and :class:`FileWriter`), never by asking which backend it is.

* Writes are atomic per file. Local: a temporary name in the same directory, ``fsync`` when
  durable, then ``rename``. Object stores: one object, made visible only when the upload
  completes (a single PUT or a completed multipart upload); an aborted upload is discarded.
* Tensor bytes are written from the caller's buffers (no copy on the local path, nor on S3,
  where the buffers are kept until ``commit`` and sent from there) and read straight into
  destination arrays (``preadv``).
* S3 (s3fs): a file is uploaded on ``commit``, in one PUT up to :data:`S3_SINGLE_PUT_MAX`,
  else as a multipart upload of :data:`S3_PART_SIZE` parts sent concurrently; the upload is
  retried as a whole (:class:`RetryPolicy`) with the buffers sent again.
* Whole-object operations on remote filesystems (reading a file or a range of it, writing a
  file from bytes, deleting, listing, conditional writes) are retried after transient failures
  (timeouts, throttling, 5xx; :func:`is_transient`) with jittered exponential backoff
  (:class:`RetryPolicy`); permanent failures are raised at once. Streamed uploads of data
  files to other object stores (gcsfs) are not retried here (the client library retries each
  of their requests).
* Conditional writes for the manager's lock and state file: :meth:`Storage.create_exclusive`,
  :meth:`Storage.replace_if`, :meth:`Storage.remove_if` (the local directory lock,
  ``flock``, is :class:`anyckpt.lease.LocalLock`).
"""

from __future__ import annotations

import bisect
import os
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .base import (
    COALESCE_GAP,
    COALESCE_LIMIT,
    TEMP_MARKER,
    Backend,
    FileReader,
    FileStat,
    FileWriter,
    PathKind,
    ReaderBase,
    Upload,
    WriterBase,
    coalesce,
    conflict,
    content_version,
)
from .fsspec_backend import FsspecBackend
from .gcs import GCSBackend
from .local import WRITEBACK_BYTES, LocalBackend, check_replaceable, preallocate, start_writeback
from .remote_errors import (
    NO_CREDENTIALS_CLASS_NAMES,
    UNREACHABLE_CLASS_NAMES,
    UNREACHABLE_ERRNOS,
    is_unreachable,
    remote_error,
    remote_errors_as_ours,
)
from .retry import (
    DEFAULT_RETRY,
    TRANSIENT_CLASS_NAMES,
    TRANSIENT_ERRNOS,
    TRANSIENT_HTTP_STATUSES,
    TRANSIENT_S3_CODES,
    RetryPolicy,
    is_transient,
    logger,
)
from .s3 import S3_PART_CONCURRENCY, S3_PART_SIZE, S3_SINGLE_PUT_MAX, S3Backend

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "COALESCE_GAP",
    "COALESCE_LIMIT",
    "DEFAULT_RETRY",
    "NO_CREDENTIALS_CLASS_NAMES",
    "S3_PART_CONCURRENCY",
    "S3_PART_SIZE",
    "S3_SINGLE_PUT_MAX",
    "TEMP_MARKER",
    "TRANSIENT_CLASS_NAMES",
    "TRANSIENT_ERRNOS",
    "TRANSIENT_HTTP_STATUSES",
    "TRANSIENT_S3_CODES",
    "UNREACHABLE_CLASS_NAMES",
    "UNREACHABLE_ERRNOS",
    "WRITEBACK_BYTES",
    "FileReader",
    "FileStat",
    "FileWriter",
    "ReaderBase",
    "RetryPolicy",
    "Storage",
    "Upload",
    "WriterBase",
    "check_replaceable",
    "choose_backend",
    "coalesce",
    "content_version",
    "is_transient",
    "is_unreachable",
    "logger",
    "preallocate",
    "preload",
    "remote_error",
    "remote_errors_as_ours",
    "start_writeback",
]


def choose_backend(fs: Any, retry: RetryPolicy, allow_symlinks: bool = False) -> Backend:
    """The backend for an fsspec filesystem: local disk, S3 (s3fs), GCS (gcsfs), or the
    generic fsspec one."""
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs, retry, allow_symlinks)
    kind = type(fs).__module__.split(".")[0]
    if kind == "s3fs":
        return S3Backend(fs, retry, allow_symlinks)
    if kind == "gcsfs":
        return GCSBackend(fs, retry, allow_symlinks)
    return FsspecBackend(fs, retry, allow_symlinks)


def preload(
    url_or_protocol: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> None:
    """Do now, in the calling thread, the one-time work of a process's first use of a
    filesystem, so that it does not compete with an event loop later (issue #19).

    ``url_or_protocol`` is a URL (``s3://bucket/run``; its bucket or path is not touched) or
    a bare protocol name (``"s3"``, ``"gs"``). The filesystem's packages are imported and the
    filesystem is made with ``storage_options`` as a manager would make it; on S3 that
    includes the botocore session and client: botocore parses its JSON data (the endpoints
    table, the S3 service model and endpoint rules, ~70 ms holding the GIL in single C calls
    that no thread switch can interrupt). fsspec keeps the filesystem for later opens with
    the **same** storage options, from any thread; other options make another client, which
    parses the JSON again. Nothing is sent to the store.

    Call it before starting the event loop, or from async code in a worker thread
    (``await anyio.to_thread.run_sync(preload, url, options)``). It raises what opening the
    storage would (an unknown protocol: fsspec's ValueError)."""
    target = os.fspath(url_or_protocol)
    if "://" not in target and target in fsspec.available_protocols():
        target = f"{target}://"
    Storage.from_url(target, storage_options)


class Storage:
    """A filesystem and the operations anyckpt needs from it. Paths are the filesystem's own
    (no protocol); :meth:`url` turns one back into a URL for messages."""

    def __init__(self, fs: Any, *, allow_symlinks: bool = False) -> None:
        self.fs = fs
        self._backend = choose_backend(fs, DEFAULT_RETRY, allow_symlinks)
        self._snapshots: dict[str, list[str]] = {}  # see listing_snapshot()

    @classmethod
    def from_url(
        cls,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        allow_symlinks: bool = False,
    ) -> tuple[Storage, str]:
        """The storage for a local path or fsspec URL, and the path within it."""
        with remote_errors_as_ours(f"opening {os.fspath(url)}"):
            fs, path = fsspec.core.url_to_fs(os.fspath(url), **(storage_options or {}))
        storage = cls(fs, allow_symlinks=allow_symlinks)
        return storage, storage._backend.normalize(path).rstrip("/") or "/"

    # -- settings and capabilities -----------------------------------------------------------
    @property
    def retry(self) -> RetryPolicy:
        """How whole-object operations are retried (remote filesystems only)."""
        return self._backend.retry

    @retry.setter
    def retry(self, policy: RetryPolicy) -> None:
        self._backend.retry = policy

    @property
    def allow_symlinks(self) -> bool:
        """Local disk: read files that are symbolic links leaving their directory (refused
        with UnsafePathError by default; links inside the directory are always read)."""
        return self._backend.allow_symlinks

    @allow_symlinks.setter
    def allow_symlinks(self, allow: bool) -> None:
        self._backend.allow_symlinks = allow

    @property
    def cheap_small_reads(self) -> bool:
        """Reading a small range costs a system call, not a network round trip: read ranges
        separately (straight into their arrays) rather than merging nearby ones (local disk)."""
        return self._backend.cheap_small_reads

    @property
    def plain_paths(self) -> bool:
        """Paths are plain local file names, absolute: each is its own URL (local disk)."""
        return self._backend.plain_paths

    @property
    def supports_flock(self) -> bool:
        """Files are on a local file system where a lock file can be ``flock``-ed, and the
        kernel drops the lock when its process dies (local disk, not on Windows)."""
        return self._backend.supports_flock

    @property
    def atomic_conditional_writes(self) -> bool:
        """Whether :meth:`create_exclusive`, :meth:`replace_if` and :meth:`remove_if` are atomic
        against other processes: on S3 and GCS (conditional requests). On memory:// they are
        atomic within the process (which is all memory:// reaches); on local disk creating is
        (a hard link), replacing and removing check and act in two steps, and the directory
        lock (:class:`anyckpt.lease.LocalLock`) keeps other anyckpt writers out; on other
        fsspec filesystems they are best effort."""
        return self._backend.atomic_conditional_writes

    def url(self, path: str) -> str:
        return self._backend.url(path)

    @staticmethod
    def join(*parts: str) -> str:
        return posixpath.join(*parts)

    # -- writing ---------------------------------------------------------------------------
    def open_writer(self, path: str, *, durable: bool = True) -> FileWriter:
        """Start writing ``path`` atomically (visible only after ``commit``)."""
        return self._backend.open_writer(path, durable)

    def write_bytes(self, path: str, data: Buffer, *, durable: bool = True) -> None:
        """Write a whole file atomically (retried as a whole on remote filesystems)."""
        self._backend.write_bytes(path, data, durable)

    def write_pieces(self, path: str, pieces: Iterable[Buffer], *, durable: bool = True) -> None:
        """Write a whole file atomically from ``pieces`` made as they are asked for: on local
        disk each is written as it comes (the whole is never in memory); elsewhere they are
        joined first, so that a retried write can write them again."""
        self._backend.write_pieces(path, pieces, durable)

    def makedirs(self, path: str) -> None:
        self._backend.makedirs(path)

    def sync_directory(self, path: str) -> None:
        """Make renames in a local directory durable (no-op on object stores)."""
        self._backend.sync_directory(path)

    def check_replaceable(self, path: str) -> None:
        """Local disk: refuse (UnsafePathError) a link, directory or other special file planted
        under a name anyckpt replaces (see :func:`check_replaceable`). Object stores have
        none of those: nothing to check."""
        self._backend.check_replaceable(path)

    def remove(self, path: str) -> bool:
        """Delete one file (a symbolic link itself, never its target); return False if it was
        already gone."""
        return self._backend.remove(path)

    # -- reading ---------------------------------------------------------------------------
    def open_reader(self, path: str) -> FileReader:
        return self._backend.open_reader(path)

    def read_bytes(self, path: str, *, max_size: int | None = None) -> bytes:
        """The whole file; refuse (CorruptCheckpointError) one larger than ``max_size``.

        One version of it, even while it is being replaced: locally the open file is read;
        remotely, in one request (a size, then a range, could straddle two versions)."""
        return self._backend.read_bytes(path, max_size)

    def exists(self, path: str) -> bool:
        return self._backend.exists(path)

    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a file (False when it cannot be asked)."""
        return self._backend.isfile(path)

    def path_kind(self, path: str) -> PathKind:
        """``"file"``, ``"dir"`` or ``"none"`` (a store that cannot be used at all raises)."""
        return self._backend.path_kind(path)

    def size(self, path: str) -> int:
        """A file's size from its metadata (the file is not opened); OSError if missing."""
        return self._backend.size(path)

    @contextmanager
    def listing_snapshot(self, path: str, names: Sequence[str]) -> Iterator[None]:
        """While in this block, :meth:`listdir_prefixed` of directory ``path`` answers from
        ``names`` (a listing the caller just made) instead of listing again. For read-only
        passes over a whole directory (``anyckpt ls``, ``verify DIR``, ``prune``), where
        asking about each of n checkpoints would otherwise list the directory n times."""
        self._snapshots[path] = sorted(names)
        try:
            yield
        finally:
            self._snapshots.pop(path, None)

    def listdir_prefixed(self, path: str, prefix: str) -> list[str]:
        """The names in directory ``path`` that start with ``prefix``, sorted (see
        :meth:`listing_snapshot`)."""
        names = self._snapshots.get(path)
        if names is None:
            return [n for n in self.listdir(path) if n.startswith(prefix)]
        start = bisect.bisect_left(names, prefix)
        stop = start
        while stop < len(names) and names[stop].startswith(prefix):
            stop += 1
        return names[start:stop]

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the files directly in a directory; [] if it does not exist."""
        return self._backend.listdir(path)

    def list_files(self, root: str) -> list[FileStat] | None:
        """The files directly in ``root`` with sizes and times; None if it is not a
        directory."""
        return self._backend.list_files(root)

    def subdirectories(self, root: str) -> list[str]:
        """Every directory under ``root`` (not ``root`` itself), sorted."""
        return self._backend.subdirectories(root)

    # -- conditional operations (the manager's lock and state file) --------------------------
    def read_versioned(self, path: str, *, max_size: int | None = None) -> tuple[bytes, str]:
        """The whole file and its version token (an ETag, a generation or a content hash), for
        a later :meth:`replace_if` or :meth:`remove_if`."""
        return self._backend.read_versioned(path, max_size)

    def create_exclusive(self, path: str, data: bytes, *, durable: bool = True) -> str:
        """Write ``path`` only if it does not exist (FileExistsError if it does); return the
        new version token."""
        return self._backend.create_exclusive(path, data, durable)

    def replace_if(
        self, path: str, data: bytes, version: str | None, *, durable: bool = True
    ) -> str:
        """Replace ``path`` with ``data`` only if it is still at ``version`` (None: only if
        it does not exist); raise :class:`~anyckpt.errors.ConcurrentWriterError` if someone
        changed it. Return the new version token."""
        if version is None:
            try:
                return self.create_exclusive(path, data, durable=durable)
            except FileExistsError:
                raise conflict(self.url(path), "creating") from None
        return self._backend.replace_if(path, data, version, durable)

    def remove_if(self, path: str, version: str) -> None:
        """Delete ``path`` only if it is still at ``version`` (ConcurrentWriterError if not)."""
        self._backend.remove_if(path, version)

    # -- unfinished multipart uploads (object stores) ----------------------------------------
    def list_uploads(self, directory: str) -> list[Upload]:
        """The multipart uploads started and never completed or aborted for objects directly
        in ``directory`` (what a process killed mid-upload leaves on S3, billed and invisible
        to listings). Empty on filesystems that have none."""
        return self._backend.list_uploads(directory)

    def abort_upload(self, upload: Upload) -> bool:
        """Abort an unfinished multipart upload (its parts are deleted); False if it is gone."""
        return self._backend.abort_upload(upload)

"""The one module that touches files: fsspec filesystems, with a fast path for local disk.

Everything here is synchronous and thread-safe; the async layers above call it from worker
threads (``anyio.to_thread``), one thread per shard, so writes, reads and CRCs (which release
the GIL) run concurrently. Remote filesystems (s3fs, gcsfs) run their own event loop in
fsspec's I/O thread, which keeps this usable under both asyncio and trio.

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
  :meth:`Storage.replace_if`, :meth:`Storage.remove_if`; and :class:`LocalLock` (``flock``).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import ctypes
import ctypes.util
import errno
import hashlib
import io
import logging
import operator
import os
import posixpath
import random
import secrets
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriterError,
    CorruptCheckpointError,
    RemoteUnavailableError,
    StorageAccessError,
    UnsafePathError,
)

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover
    fcntl = None

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: Marker in the names of files being written; what is left of a crash carries it.
TEMP_MARKER = ".anyckpt-tmp-"

_T = TypeVar("_T")


def _iov_max() -> int:
    """Most buffers one writev/preadv call takes (IOV_MAX, 1024 on Linux)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 16
    return min(n, 1024) if n > 0 else 16


_IOV_MAX = _iov_max()


#: ``fallocate(2)``'s mode flag that reserves blocks without changing the file's size.
_FALLOC_FL_KEEP_SIZE = 1


def _load_libc(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """A libc function (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_fallocate = _load_libc("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_sync_file_range = _load_libc(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
)
#: ``sync_file_range(2)``: start writing the range's dirty pages out, do not wait.
_SYNC_FILE_RANGE_WRITE = 2
#: A durable file being written has its pages sent to the disk every this many bytes, so the
#: final fsync waits for the last stretch only, not for the whole file (1 GiB: 0.20 -> 0.12 s).
WRITEBACK_BYTES = 32 << 20


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve the blocks of ``length`` bytes at ``offset`` of a file about to be written
    (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``, as ``ndarray.tofile`` does); return whether
    the file system did. The file's size and contents do not change; writes into reserved
    blocks skip the file system's per-page delayed allocation (ext4: ~20% of a page-cache
    write). Unsupported (other systems, file systems without it): False, nothing done."""
    if _fallocate is None or length <= 0:
        return False
    return _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing ``length`` bytes at ``offset`` of a file out to its disk, without waiting
    (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``); return whether the system did. It
    guarantees nothing by itself (``fsync`` still does that) but lets the disk work while
    more is written. Unsupported: False, nothing done."""
    if _sync_file_range is None or length <= 0:
        return False
    return _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


#: Size in bytes of a memoryview or NumPy array (both have ``nbytes``).
_NBYTES = operator.attrgetter("nbytes")


def _bytes_view(buffer: Buffer) -> memoryview:
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


class FileWriter(Protocol):
    """A file being written; nothing is visible under its name before :meth:`commit`.

    The buffers given to :meth:`write` must not change until :meth:`commit` or :meth:`abort`
    returns: a remote writer may keep them and send them from there."""

    path: str

    def write(self, data: Buffer) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class FileReader(Protocol):
    """Random access to one file of known size (``size``; there is no seek or tell: every
    read names its offset). Reads past the end raise CorruptCheckpointError.

    :meth:`read_ranges` and :meth:`read_ranges_into` read many ranges at once: locally with
    ``preadv``, remotely in concurrent requests, nearby ranges merged into one (gaps under
    :data:`COALESCE_GAP`), so a format reading many tensors pays for a few round trips, not
    one per tensor."""

    path: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def read_into(self, offset: int, buffer: Buffer) -> None: ...
    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]: ...
    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None: ...
    def close(self) -> None: ...


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


def _views_for(ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
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


#: Flags of every local open: never follow a symbolic link at the last component, never
#: block on a FIFO planted under a checkpoint's name, and close on exec.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_SAFE_OPEN = _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def check_replaceable(path: str) -> None:
    """Refuse (:class:`~anyckpt.errors.UnsafePathError`) to replace local ``path`` by a
    rename if something other than a regular file is planted there: a symbolic link
    (dangling, to a device, anywhere), a directory, a FIFO, a socket or a device. A missing
    file is fine. (A hard link is fine too: a rename replaces this name only, and the other
    names keep the old contents.)"""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(
            f"refusing to write: the name is taken by {_kind(st.st_mode)}, not a regular file",
            path=path,
        )


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


#: Random temporary names a writer tries before giving up (each taken already: planted).
_TEMP_NAME_TRIES = 8


class _LocalWriter:
    def __init__(self, path: str, durable: bool) -> None:
        self.path = path
        self._durable = durable
        check_replaceable(path)
        # A random name, created exclusively and never through a link (O_EXCL never follows
        # one): a link or file planted at a temporary name cannot redirect the write; the
        # writer takes another name instead.
        for attempt in range(_TEMP_NAME_TRIES):
            self._tmp = f"{path}{TEMP_MARKER}{secrets.token_hex(8)}"
            try:
                fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE_OPEN, 0o644)
                break
            except FileExistsError:
                if attempt == _TEMP_NAME_TRIES - 1:
                    raise
        self._fd: int | None = fd
        self._end = 0  # bytes written
        self._sent = 0  # bytes whose writeback was started

    def write(self, data: Buffer) -> None:
        assert self._fd is not None
        view = _bytes_view(data)
        while view.nbytes:
            written = os.write(self._fd, view)
            view = view[written:]
            self._end += written
        self._write_back()

    def _write_back(self) -> None:
        """Durable files: send what was written to the disk every WRITEBACK_BYTES."""
        if self._durable and self._end - self._sent >= WRITEBACK_BYTES:
            assert self._fd is not None
            start_writeback(self._fd, self._sent, self._end - self._sent)
            self._sent = self._end

    def reserve(self, offset: int, length: int) -> None:
        """Reserve the blocks of the ``length`` bytes at ``offset`` about to be written
        (:func:`preallocate`); the file's size does not change."""
        assert self._fd is not None
        preallocate(self._fd, offset, length)

    def write_many(self, buffers: Sequence[Buffer]) -> None:
        """Write buffers (byte views, C-contiguous arrays) back to back, up to IOV_MAX per
        system call (``writev``): many small tensors cost a few calls, and nothing is copied
        into a staging buffer."""
        assert self._fd is not None
        if not hasattr(os, "writev"):
            for view in buffers:
                self.write(view)
            return
        views = list(buffers)
        while views:
            batch = views[:_IOV_MAX]
            written = os.writev(self._fd, batch)
            self._end += written
            if written == sum(map(_NBYTES, batch)):  # the usual case: all of it
                views = views[_IOV_MAX:]
                continue
            # A short write: drop what was written, redo the rest of the view it stopped in.
            done = 0
            for view in batch:
                size = _NBYTES(view)
                if written < size:
                    break
                written -= size
                done += 1
            views = views[done:]
            if written:
                views[0] = _bytes_view(views[0])[written:]
        self._write_back()

    def commit(self) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        check_replaceable(self.path)  # (planted while we wrote)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with suppress(FileNotFoundError):
            os.unlink(self._tmp)


class _FsspecWriter:
    """Object stores (s3fs, gcsfs): one upload, visible only when ``close()`` completes it.
    Other fsspec filesystems (memory://, ...) may show a file from ``open()`` on, so they get
    a temporary name that is moved over the target on commit."""

    def __init__(self, fs: Any, path: str) -> None:
        self.path = path
        self._fs = fs
        self._direct = _is_object_store(fs)
        self._target = path if self._direct else f"{path}{TEMP_MARKER}{secrets.token_hex(4)}"
        self._what = f"writing {fs.unstrip_protocol(path)}"
        with remote_errors_as_ours(self._what, fs):
            self._file = fs.open(self._target, "wb")

    def write(self, data: Buffer) -> None:
        with remote_errors_as_ours(self._what, self._fs):
            self._file.write(_bytes_view(data))

    def commit(self) -> None:
        with remote_errors_as_ours(self._what, self._fs):
            self._file.close()
            if not self._direct:
                self._fs.mv(self._target, self.path)

    def abort(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.discard()
        finally:
            # discard() leaves s3fs's file (and gcsfs's, before its first block went out) open,
            # and the file's finalizer closes it: gcsfs then uploads what was aborted, s3fs
            # raises from __del__. Closed, it is never flushed.
            if isinstance(file, AbstractBufferedFile):
                file.closed = True
        if self._direct:
            # Nothing became visible; an object already under this name is the previous
            # version and must stay.
            return
        with suppress(FileNotFoundError):
            if self._fs.exists(self._target):
                self._fs.rm_file(self._target)


#: Files up to this size go to S3 in one PUT; bigger ones in a multipart upload. One request
#: per file is the cheapest for the client and the server (no part to store, re-read and
#: join), and a sharded save already sends its files concurrently; the parts of a bigger
#: file are sent while it is written, concurrently. (S3 takes up to 5 GiB in one PUT.)
S3_SINGLE_PUT_MAX = 512 * 2**20
#: The part size of those multipart uploads (S3: at least 5 MiB; doubled every 1,000 parts).
S3_PART_SIZE = 64 * 2**20
#: Parts of one file in flight at once.
S3_PART_CONCURRENCY = 4


class _GatherBody(io.RawIOBase):
    """Byte views back to back, as a read-only, seekable file: the body of one upload request,
    read from the caller's buffers (``read`` copies only the bytes it returns)."""

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__()
        self._views = views
        self._starts = [0]
        for view in views:
            self._starts.append(self._starts[-1] + view.nbytes)
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """As :class:`io.BytesIO`: a negative absolute position is an error, a relative one
        stops at the start."""
        if whence == io.SEEK_SET and offset < 0:
            raise ValueError(f"negative seek position {offset}")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        chunks = _slice_views(self._views, self._starts, self._pos, end)
        self._pos = end
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)

    def readinto(self, buffer: Buffer) -> int:
        view = _bytes_view(buffer)
        data = self.read(view.nbytes)
        view[: len(data)] = data
        return len(data)


def _slice_views(
    views: list[memoryview], starts: list[int], start: int, stop: int
) -> list[memoryview]:
    """The bytes ``start:stop`` of ``views`` back to back (``starts``: their offsets, and the
    total size last), as views of them."""
    out: list[memoryview] = []
    i = bisect.bisect_right(starts, start) - 1
    while start < stop:
        view = views[i]
        begin = start - starts[i]
        take = min(view.nbytes - begin, stop - start)
        if take > 0:
            out.append(view[begin : begin + take])
            start += take
        i += 1
    return out


class _S3Writer:
    """S3 through s3fs: the buffers written are kept (not copied) and sent from there. A file
    of up to :data:`S3_SINGLE_PUT_MAX` bytes is uploaded on :meth:`commit` in one PUT; once
    a file grows past it, a multipart upload starts and each :data:`S3_PART_SIZE` bytes
    written are sent as a part (at most :data:`S3_PART_CONCURRENCY` in flight: ``write``
    waits for one to finish), then released. So at most about ``S3_SINGLE_PUT_MAX`` bytes are
    held (the caller's own buffers, except what a format made for the file: strings,
    compressed frames...).

    The requests go straight to s3fs's client, with s3fs's extra arguments (server-side
    encryption, requester pays...), and each try of a request reads its bytes from the start:
    the client library retries each request (rewinding its body), :class:`RetryPolicy` the
    PUT or each part as a whole. Nothing exists under the name before the upload completes; a
    multipart upload that fails or is aborted is aborted on the server. Integrity: the client
    sends the checksum its configuration asks for (botocore: a CRC32 of every request body by
    default, which S3 verifies; over plain http, a SHA-256 of the body in the signature too,
    unless ``config_kwargs={"s3": {"payload_signing_enabled": False}}``), and the V2 data
    file's own CRC32C of every tensor is verified when it is read."""

    def __init__(self, fs: Any, path: str, retry: RetryPolicy) -> None:
        self.path = path
        self._fs = fs
        self._retry = retry
        self._views: list[memoryview] = []  # written, not sent yet
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._bucket, self._key, _ = fs.split_path(path)

    def write(self, data: Buffer) -> None:
        view = memoryview(data)
        if not view.nbytes:  # (an empty array's view, shaped (0, n), cannot be cast)
            return
        view = _bytes_view(view)
        self._views.append(view)
        self._size += view.nbytes
        if self._upload_id is None and self._size > S3_SINGLE_PUT_MAX:
            out = self._retry.run(
                lambda: self._sync(self._call, "create_multipart_upload"), self._what(), self._fs
            )
            self._upload_id = str(out["UploadId"])
        if self._upload_id is not None:
            while self._size >= self._part_size():
                self._send_part(self._part_size())

    def write_many(self, buffers: list[memoryview]) -> None:
        for buffer in buffers:
            self.write(buffer)

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                self._retry.run(
                    lambda: self._sync(self._call, "put_object", Body=_GatherBody(self._views)),
                    self._what(),
                    self._fs,
                )
            else:
                with remote_errors_as_ours(self._what(), self._fs):  # (parts' own errors)
                    if self._size:
                        self._send_part(self._size)
                    parts = [part.result() for part in self._parts]
                self._retry.run(
                    lambda: self._sync(
                        self._call,
                        "complete_multipart_upload",
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": parts},
                    ),
                    self._what(),
                    self._fs,
                )
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            self._views = []
            self._fs.invalidate_cache(self.path)

    def abort(self) -> None:
        self._views = []
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return  # nothing was sent, or the upload completed
        for part in self._parts:
            part.cancel()
        concurrent.futures.wait(self._parts)
        with suppress(Exception):
            self._sync(self._call, "abort_multipart_upload", UploadId=upload_id)

    def _what(self) -> str:
        return f"writing {self._fs.unstrip_protocol(self.path)}"

    def _sync(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fsspec.asyn.sync(self._fs.loop, func, *args, **kwargs)

    def _part_size(self) -> int:
        # Doubled every 1,000 parts: S3 takes at most 10,000 per upload.
        return int(S3_PART_SIZE) << (len(self._parts) // 1000)

    def _send_part(self, size: int) -> None:
        """Send the first ``size`` bytes not sent yet as the next part (in the background);
        first wait for a free slot, and raise the error of a part that failed."""
        while True:
            pending = [p for p in self._parts if not p.done()]
            for part in self._parts:
                if part.done() and part.exception() is not None:
                    part.result()  # raises it
            if len(pending) < S3_PART_CONCURRENCY:
                break
            concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        starts = [0]
        for view in self._views:
            starts.append(starts[-1] + view.nbytes)
        views = _slice_views(self._views, starts, 0, size)
        rest = _slice_views(self._views, starts, size, self._size)
        self._views, self._size = rest, self._size - size
        number = len(self._parts) + 1
        self._parts.append(
            asyncio.run_coroutine_threadsafe(self._send(number, views), self._fs.loop)
        )

    async def _send(self, number: int, views: list[memoryview]) -> dict[str, Any]:
        """Upload one part, retried as a whole after transient failures."""
        attempt = 1
        while True:
            try:
                out = await self._call(
                    "upload_part",
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=_GatherBody(views),
                )
                return {"PartNumber": number, "ETag": out["ETag"]}
            except Exception as exc:  # noqa: PERF203 - the loop is the retry
                if attempt >= self._retry.attempts or not is_transient(exc):
                    raise
                pause = self._retry.delay(attempt)
                logger.warning(
                    "%s, part %d, failed (%s: %s); retry %d of %d in %.3f s",
                    self._what(),
                    number,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self._retry.attempts - 1,
                    pause,
                )
                await asyncio.sleep(pause)
                attempt += 1

    async def _call(self, method: str, **kwargs: Any) -> Any:
        """One request of s3fs's client on this object, its errors translated as s3fs's."""
        fs = self._fs
        await fs.set_session()
        client = await fs.get_s3(self._bucket)
        call = getattr(client, method)
        kwargs.update(Bucket=self._bucket, Key=self._key)
        try:
            return await call(**fs._get_s3_method_kwargs(call, **kwargs))
        except Exception as exc:
            from s3fs.errors import translate_boto_error

            error = translate_boto_error(exc)
            if error is exc:
                raise
            raise error from exc


def _open_for_reading(path: str, allow_symlinks: bool) -> int:
    """Open local ``path`` to read it: a regular file, or a symbolic link whose target stays
    inside the file's directory (any link with ``allow_symlinks``). A link leaving the
    directory raises UnsafePathError; a directory, FIFO or device CorruptCheckpointError."""
    try:
        fd = os.open(path, os.O_RDONLY | _SAFE_OPEN)
    except OSError as exc:
        if exc.errno != errno.ELOOP or not _NOFOLLOW:
            raise
        if allow_symlinks:
            fd = os.open(path, os.O_RDONLY | (_SAFE_OPEN & ~_NOFOLLOW))
        else:
            target = os.path.realpath(path)
            home = os.path.realpath(os.path.dirname(path) or ".")
            if os.path.commonpath([home, target]) != home:
                raise UnsafePathError(
                    f"a symbolic link to {target}, outside the checkpoint's directory "
                    f"{home} (pass allow_symlinks=True to follow it)",
                    path=path,
                ) from None
            try:
                fd = os.open(target, os.O_RDONLY | _SAFE_OPEN)
            except OSError as again:
                if again.errno == errno.ELOOP:
                    raise UnsafePathError("a loop of symbolic links", path=path) from None
                raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CorruptCheckpointError(f"{_kind(mode)}, not a regular file", path=path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _LocalReader:
    def __init__(self, path: str, allow_symlinks: bool = False) -> None:
        self.path = path
        self._fd = _open_for_reading(path, allow_symlinks)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buffer: Buffer) -> None:
        view = _bytes_view(buffer)
        if offset < 0 or offset + view.nbytes > self.size:
            raise CorruptCheckpointError(
                f"read of {view.nbytes} bytes at offset {offset} is past the end of the file "
                f"({self.size} bytes)",
                path=self.path,
            )
        while view.nbytes:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise CorruptCheckpointError("file shrank while being read", path=self.path)
            view = view[n:]
            offset += n

    def read_into_many(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill byte views from the file bytes starting at ``offset``, back to back, up to
        IOV_MAX per system call (``preadv``): a run of small tensors is read straight into
        its destination arrays in a few calls."""
        total = sum(v.nbytes for v in buffers)
        if offset < 0 or offset + total > self.size:
            raise CorruptCheckpointError(
                f"read of {total} bytes at offset {offset} is past the end of the file "
                f"({self.size} bytes)",
                path=self.path,
            )
        views = [v for v in buffers if v.nbytes]
        while views:
            batch = views[:_IOV_MAX]
            n = os.preadv(self._fd, batch, offset)
            if n == 0:
                raise CorruptCheckpointError("file shrank while being read", path=self.path)
            offset += n
            done = 0
            for view in batch:
                if n < view.nbytes:
                    break
                n -= view.nbytes
                done += 1
            views = views[done:]
            if n:
                views[0] = views[0][n:]

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        views = _views_for(ranges)
        self.read_ranges_into([(o, v) for (o, _), v in zip(ranges, views, strict=True)])
        return views

    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        for offset, buffer in requests:  # one preadv each: no round trips to save locally
            self.read_into(offset, buffer)

    def close(self) -> None:
        os.close(self._fd)


class _FsspecReader:
    def __init__(self, fs: Any, path: str, retry: RetryPolicy) -> None:
        self.path = path
        self._fs = fs
        self._retry = retry
        self._what = f"reading {fs.unstrip_protocol(path)}"
        self.size = int(retry.run(lambda: fs.size(path), self._what, fs))

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"read of {length} bytes at offset {offset} is past the end of the file "
                f"({self.size} bytes)",
                path=self.path,
            )
        if length == 0:
            return b""
        with _not_found_as_ours(str(self._fs.unstrip_protocol(self.path))):  # deleted since
            data = bytes(
                self._retry.run(
                    lambda: self._fs.cat_file(self.path, start=offset, end=offset + length),
                    self._what,
                    self._fs,
                )
            )
        if len(data) != length:
            raise CorruptCheckpointError("short read", path=self.path)
        return data

    def read_into(self, offset: int, buffer: Buffer) -> None:
        view = _bytes_view(buffer)
        view[:] = self.read(offset, view.nbytes)

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        views = _views_for(ranges)
        self.read_ranges_into([(o, v) for (o, _), v in zip(ranges, views, strict=True)])
        return views

    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        views = [_bytes_view(buffer) for _, buffer in requests]
        ranges = [(offset, v.nbytes) for (offset, _), v in zip(requests, views, strict=True)]
        for offset, length in ranges:
            if offset < 0 or offset + length > self.size:
                raise CorruptCheckpointError(
                    f"read of {length} bytes at offset {offset} is past the end of the file "
                    f"({self.size} bytes)",
                    path=self.path,
                )
        groups = [g for g in coalesce(ranges) if g[1] > g[0]]
        if not groups:
            return
        n = len(groups)

        def fetch() -> list[Any]:
            return list(
                self._fs.cat_ranges(
                    [self.path] * n,
                    [start for start, _, _ in groups],
                    [end for _, end, _ in groups],
                    on_error="raise",
                )
            )

        with _not_found_as_ours(str(self._fs.unstrip_protocol(self.path))):
            blobs = self._retry.run(fetch, f"reading {self.path}")
        for (start, end, members), blob in zip(groups, blobs, strict=True):
            data = memoryview(blob)
            if data.nbytes != end - start:
                raise CorruptCheckpointError("short read", path=self.path)
            for i in members:
                offset, length = ranges[i]
                views[i][:] = data[offset - start : offset - start + length]

    def close(self) -> None:
        pass


@contextmanager
def _not_found_as_ours(path: str) -> Iterator[None]:
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


class Storage:
    """A filesystem and the operations anyckpt needs from it. Paths are the filesystem's own
    (no protocol); :meth:`url` turns one back into a URL for messages."""

    def __init__(self, fs: Any, *, allow_symlinks: bool = False) -> None:
        self.fs = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        if type(fs).__module__.split(".")[0] == "gcsfs":
            _gcsfs_fails_fast(fs)
        elif _is_s3fs(fs):
            _s3fs_fails_fast(fs)
        #: How whole-object operations are retried (remote filesystems only).
        self.retry: RetryPolicy = DEFAULT_RETRY
        self._snapshots: dict[str, list[str]] = {}  # see listing_snapshot()
        #: Local disk: read files that are symbolic links leaving their directory (refused
        #: with UnsafePathError by default; links inside the directory are always read).
        self.allow_symlinks = allow_symlinks

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
        if storage.is_local:
            path = os.path.abspath(path)
        return storage, path.rstrip("/") or "/"

    def url(self, path: str) -> str:
        if self.is_local:
            return path
        return str(self.fs.unstrip_protocol(path))

    @staticmethod
    def join(*parts: str) -> str:
        return posixpath.join(*parts)

    # -- writing ---------------------------------------------------------------------------
    def open_writer(self, path: str, *, durable: bool = True) -> FileWriter:
        """Start writing ``path`` atomically (visible only after ``commit``)."""
        if self.is_local:
            return _LocalWriter(path, durable)
        if _is_s3fs(self.fs):
            return _S3Writer(self.fs, path, self.retry)
        return _FsspecWriter(self.fs, path)

    def write_bytes(self, path: str, data: Buffer, *, durable: bool = True) -> None:
        """Write a whole file atomically (retried as a whole on remote filesystems)."""
        if _is_s3fs(self.fs):  # its writer retries the upload as a whole itself
            writer = _S3Writer(self.fs, path, self.retry)
            writer.write(data)
            writer.commit()
            return

        def write() -> None:
            writer = self.open_writer(path, durable=durable)
            try:
                writer.write(data)
                writer.commit()
            except BaseException:
                writer.abort()
                raise

        self._retrying(write, f"writing {self.url(path)}")

    def makedirs(self, path: str) -> None:
        self._retrying(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}")

    def sync_directory(self, path: str) -> None:
        """Make renames in a local directory durable (no-op on object stores)."""
        if not self.is_local:
            return
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def check_replaceable(self, path: str) -> None:
        """Local disk: refuse (UnsafePathError) a link, directory or other special file planted
        under a name anyckpt replaces (see :func:`check_replaceable`). Object stores have
        none of those: nothing to check."""
        if self.is_local:
            check_replaceable(path)

    def remove(self, path: str) -> bool:
        """Delete one file (a symbolic link itself, never its target); return False if it was
        already gone."""
        return self._retrying(lambda: self._remove(path), f"removing {self.url(path)}")

    def _remove(self, path: str) -> bool:
        try:
            if self.is_local:
                try:
                    os.unlink(path)  # a link itself, never what it points to
                except IsADirectoryError:
                    raise UnsafePathError(
                        "a directory where a checkpoint file belongs: not removing it",
                        path=path,
                    ) from None
            elif _is_object_store(self.fs) and not self.fs.exists(path):
                return False  # deleting a missing object succeeds on S3: ask first
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    # -- reading ---------------------------------------------------------------------------
    def open_reader(self, path: str) -> FileReader:
        with _not_found_as_ours(self.url(path)):
            if self.is_local:
                return _LocalReader(path, self.allow_symlinks)
            return _FsspecReader(self.fs, path, self.retry)

    def read_bytes(self, path: str, *, max_size: int | None = None) -> bytes:
        """The whole file; refuse (CorruptCheckpointError) one larger than ``max_size``.

        One version of it, even while it is being replaced: locally the open file is read;
        remotely, in one request (a size, then a range, could straddle two versions)."""
        if not self.is_local:
            return self._retrying(
                lambda: self._read_whole(path, max_size), f"reading {self.url(path)}"
            )
        reader = self.open_reader(path)
        try:
            if max_size is not None and reader.size > max_size:
                raise CorruptCheckpointError(
                    f"file is {reader.size} bytes, more than the {max_size} allowed",
                    path=self.url(path),
                )
            return reader.read(0, reader.size)
        finally:
            reader.close()

    def _read_whole(self, path: str, max_size: int | None) -> bytes:
        def too_big(size: int) -> CorruptCheckpointError:
            return CorruptCheckpointError(
                f"file is {size} bytes, more than the {max_size} allowed", path=self.url(path)
            )

        with _not_found_as_ours(self.url(path)):
            if max_size is not None:
                size = int(self.fs.size(path))
                if size > max_size:
                    raise too_big(size)
            data = bytes(self.fs.cat_file(path))
        if max_size is not None and len(data) > max_size:
            raise too_big(len(data))
        return data

    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        return self._retrying(lambda: bool(self.fs.exists(path)), f"looking for {self.url(path)}")

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
        if self.is_local:
            try:
                return sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        return self._retrying(lambda: self._listdir(path), f"listing {self.url(path)}")

    def _listdir(self, path: str) -> list[str]:
        try:
            if _is_object_store(self.fs):
                entries = self.fs.ls(path, detail=False, refresh=True)
                # Keep no listing in the cache: s3fs and gcsfs answer exists(), size() and
                # info() for the files of a cached directory from it, so what other processes
                # changed since (files written, deleted, truncated) would go unseen.
                self.fs.invalidate_cache(path)
            else:
                entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    # -- conditional operations (the manager's lock and state file) --------------------------
    def _conditional(self) -> _S3Conditional | _GCSConditional | None:
        kind = type(self.fs).__module__.split(".")[0]
        if kind == "s3fs":
            return _S3Conditional(self.fs)
        if kind == "gcsfs":
            return _GCSConditional(self.fs)
        return None

    @property
    def atomic_conditional_writes(self) -> bool:
        """Whether :meth:`create_exclusive`, :meth:`replace_if` and :meth:`remove_if` are atomic
        against other processes: on S3 and GCS (conditional requests). On memory:// they are
        atomic within the process (which is all memory:// reaches); on local disk creating is
        (a hard link), replacing and removing check and act in two steps, and the directory
        lock (:class:`LocalLock`) keeps other anyckpt writers out; on other fsspec filesystems
        they are best effort."""
        return self._conditional() is not None

    def read_versioned(self, path: str, *, max_size: int | None = None) -> tuple[bytes, str]:
        """The whole file and its version token (an ETag, a generation or a content hash), for
        a later :meth:`replace_if` or :meth:`remove_if`."""
        backend = self._conditional()
        if backend is None:
            data = self.read_bytes(path, max_size=max_size)
            return data, content_version(data)

        def read() -> tuple[bytes, str]:
            with _not_found_as_ours(self.url(path)):
                return backend.read(path)

        data, version = self._retrying(read, f"reading {self.url(path)}")
        if max_size is not None and len(data) > max_size:
            raise CorruptCheckpointError(
                f"file is {len(data)} bytes, more than the {max_size} allowed", path=self.url(path)
            )
        return data, version

    def create_exclusive(self, path: str, data: bytes, *, durable: bool = True) -> str:
        """Write ``path`` only if it does not exist (FileExistsError if it does); return the
        new version token."""
        if self.is_local:
            return self._local_create(path, data, durable)
        backend = self._conditional()
        if backend is None:
            with _CONDITIONAL_LOCK:
                if self.fs.exists(path):
                    raise FileExistsError(errno.EEXIST, "exists", self.url(path))
                self.write_bytes(path, data, durable=durable)
            return content_version(data)
        return self._conditionally(path, data, lambda: backend.create(path, data))

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
                raise _conflict(self.url(path), "creating") from None
        backend = self._conditional()
        if backend is not None:
            return self._conditionally(path, data, lambda: backend.replace(path, data, version))
        with _CONDITIONAL_LOCK if not self.is_local else nullcontext():
            self._check_version(path, version, "replacing")
            self.write_bytes(path, data, durable=durable)
        return content_version(data)

    def remove_if(self, path: str, version: str) -> None:
        """Delete ``path`` only if it is still at ``version`` (ConcurrentWriterError if not)."""
        backend = self._conditional()
        if backend is not None:
            self._retrying(lambda: backend.remove(path, version), f"removing {self.url(path)}")
            return
        with _CONDITIONAL_LOCK if not self.is_local else nullcontext():
            self._check_version(path, version, "removing")
            self.remove(path)

    def _check_version(self, path: str, version: str, what: str) -> None:
        try:
            current = content_version(self.read_bytes(path))
        except CheckpointNotFoundError:
            raise _conflict(self.url(path), what) from None
        if current != version:
            raise _conflict(self.url(path), what)

    def _local_create(self, path: str, data: bytes, durable: bool) -> str:
        """Write a temporary file, then hard-link it to ``path``: the link fails if ``path``
        exists, so the file appears complete or not at all, and only once."""
        tmp = f"{path}{TEMP_MARKER}{secrets.token_hex(4)}"
        writer = _LocalWriter(tmp, durable)
        try:
            writer.write(data)
            writer.commit()
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, "exists", path) from None
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        if durable:
            self.sync_directory(posixpath.dirname(path))
        return content_version(data)

    def _conditionally(self, path: str, data: bytes, op: Callable[[], str]) -> str:
        """A conditional write, retried like the others. A try may be applied although its
        answer was lost (a timeout); the next try, here or inside the client library (s3fs
        and gcsfs retry requests themselves), then finds the precondition broken. So a broken
        precondition is checked: the file holding exactly ``data`` proves the write done."""
        try:
            return self._retrying(op, f"writing {self.url(path)}")
        except (FileExistsError, ConcurrentWriterError):
            with suppress(CheckpointNotFoundError):
                current, version = self.read_versioned(path)
                if current == data:
                    return version
            raise

    # -- local lock ------------------------------------------------------------------------
    # -- unfinished multipart uploads (object stores) ----------------------------------------
    def list_uploads(self, directory: str) -> list[Upload]:
        """The multipart uploads started and never completed or aborted for objects directly
        in ``directory`` (what a process killed mid-upload leaves on S3, billed and invisible
        to listings). Empty on filesystems that have none."""
        if not _is_s3fs(self.fs):
            return []
        bucket, key, _ = self.fs.split_path(directory)
        prefix = f"{key}/" if key else ""

        def call(method: str, **kwargs: Any) -> Any:
            return self._retrying(
                lambda: self.fs.call_s3(method, Bucket=bucket, **kwargs),
                f"listing uploads under {self.url(directory)}",
            )

        found: list[Upload] = []
        markers: dict[str, Any] = {}
        while True:
            page = call("list_multipart_uploads", Prefix=prefix, **markers)
            for item in page.get("Uploads", []):
                name = str(item["Key"])[len(prefix) :]
                if not name or "/" in name:
                    continue
                size = 0
                part_marker: dict[str, Any] = {}
                while True:
                    parts = call(
                        "list_parts", Key=item["Key"], UploadId=item["UploadId"], **part_marker
                    )
                    size += sum(int(p.get("Size", 0)) for p in parts.get("Parts", []))
                    if not parts.get("IsTruncated"):
                        break
                    part_marker = {"PartNumberMarker": parts["NextPartNumberMarker"]}
                started = item.get("Initiated")
                found.append(
                    Upload(
                        posixpath.join(directory, name),
                        str(item["UploadId"]),
                        started.timestamp() if hasattr(started, "timestamp") else None,
                        size,
                    )
                )
            if not page.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }
        return sorted(found, key=lambda u: (u.path, u.initiated or 0.0))

    def abort_upload(self, upload: Upload) -> bool:
        """Abort an unfinished multipart upload (its parts are deleted); False if it is gone."""
        bucket, key, _ = self.fs.split_path(upload.path)
        try:
            self._retrying(
                lambda: self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload.upload_id
                ),
                f"aborting the upload of {self.url(upload.path)}",
            )
        except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
            return False
        return True

    def lock_local(self, path: str) -> LocalLock:
        """Take the exclusive lock of local file ``path`` (FileExistsError if another holds
        it); see :class:`LocalLock`."""
        assert self.is_local
        return LocalLock(path)

    def _retrying(self, op: Callable[[], _T], what: str) -> _T:
        if self.is_local:
            return op()
        return self.retry.run(op, what, self.fs)


def _is_s3fs(fs: Any) -> bool:
    """An s3fs filesystem (not a wrapper or test double declaring itself an object store)."""
    return type(fs).__module__.split(".")[0] == "s3fs" and hasattr(fs, "get_s3")


def _is_object_store(fs: Any) -> bool:
    """s3fs or gcsfs: listings are cached, and a file being written is invisible until closed.
    A filesystem (a wrapper, a test double) may say so with ``anyckpt_object_store = True``."""
    declared = getattr(fs, "anyckpt_object_store", None)
    if isinstance(declared, bool):
        return declared
    return type(fs).__module__.split(".")[0] in {"s3fs", "gcsfs"}


# -- retries -------------------------------------------------------------------------------

logger = logging.getLogger("anyckpt.storage")

#: errno values of failures that go away by themselves: throttling and unavailability (s3fs
#: maps S3's SlowDown, ServiceUnavailable and 409 conflicts to EBUSY, InternalError and 500
#: to EREMOTEIO), timeouts and dropped connections. Not a connection that could not be made
#: at all (refused, no route: :data:`UNREACHABLE_ERRNOS`).
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
#: HTTP statuses that are worth another try (request timeout, throttling, server errors).
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: S3 error codes of the same kind, for errors that carry the code but not the status.
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "OperationAborted"}
)  # fmt: skip
#: Network failures of the clients under s3fs and gcsfs (botocore, aiohttp), by class name so
#: that neither needs importing: timeouts, refused or dropped connections, truncated bodies;
#: and requests' ProxyError, which is how gcsfs reports an HTTP 502 answer.
TRANSIENT_CLASS_NAMES = frozenset(
    {"HTTPClientError", "ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError",
     "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
     "ClientPayloadError", "IncompleteRead", "ProxyError"}
)  # fmt: skip
#: errno values of a connection that could not be made at all: nothing listens there, or the
#: network has no route to it. Permanent (see :func:`is_unreachable`).
UNREACHABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNREFUSED", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH", "EHOSTDOWN")
    if hasattr(errno, name)
)
#: The same failures as the clients raise them: botocore (refused, unknown host, no route),
#: aiohttp (gcsfs: refused, DNS failure, TLS handshake refused).
UNREACHABLE_CLASS_NAMES = frozenset(
    {"EndpointConnectionError", "ClientConnectorError", "ProxyConnectionError",
     "ConnectionRefusedError", "gaierror", "RemoteUnavailableError"}
)  # fmt: skip
#: Missing or unusable credentials, as botocore and google-auth raise them.
NO_CREDENTIALS_CLASS_NAMES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
     "NoAuthTokenError", "DefaultCredentialsError", "RefreshError", "TransportError"}
)  # fmt: skip


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during (botocore's or aiohttp's error under the
    filesystem's), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)


def _named(error: BaseException, names: frozenset[str]) -> bool:
    return any(k.__name__ in names for k in type(error).__mro__)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a connection that could not be made at
    all: refused, an unknown host, no route to it. Trying again does not help, so it is not
    transient: a store that cannot be reached fails at once (:class:`RemoteUnavailableError`)
    rather than after minutes of retries."""
    for error in _chain(exc):
        if isinstance(error, RemoteUnavailableError) or _named(error, UNREACHABLE_CLASS_NAMES):
            return True
        if isinstance(error, OSError) and error.errno in UNREACHABLE_ERRNOS:
            return True
    return False


def _no_credentials(exc: BaseException) -> BaseException | None:
    return next((e for e in _chain(exc) if _named(e, NO_CREDENTIALS_CLASS_NAMES)), None)


def _endpoint_of(fs: Any) -> str | None:
    """The endpoint a remote filesystem sends its requests to, when it was given one."""
    for value in (
        getattr(fs, "endpoint_url", None),  # s3fs, if given
        (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url"),
        getattr(fs, "_endpoint", None),  # gcsfs
    ):
        if isinstance(value, str) and value:
            return value
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def remote_error(exc: BaseException, what: str, fs: Any = None) -> CheckpointError | None:
    """The anyckpt error for a remote store that cannot be used at all, or None for other
    failures: no credentials (:class:`~anyckpt.errors.StorageAccessError`), a store that cannot
    be reached (:class:`~anyckpt.errors.RemoteUnavailableError`). ``what`` is the operation
    ("listing s3://bucket/x"); the message is one line: the operation, the cause and a hint."""
    google = any(f"{p}://" in what for p in ("gs", "gcs")) or (
        fs is not None and type(fs).__module__.split(".")[0] == "gcsfs"
    )
    missing = _no_credentials(exc)
    if missing is not None:
        if google:
            hint = (
                "no usable Google credentials: set GOOGLE_APPLICATION_CREDENTIALS or pass "
                "-o token=PATH; for a public bucket, -o token=anon"
            )
        else:
            hint = (
                "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE, or pass -o key=... -o secret=...; for a public bucket, -o anon=true"
            )
        return StorageAccessError(f"{what}: {_first_line(missing)}", hint=hint)
    if is_unreachable(exc):
        cause = next((e for e in _chain(exc) if not isinstance(e, RemoteUnavailableError)), exc)
        endpoint = _endpoint_of(fs) if fs is not None else None
        where = f"the endpoint {endpoint}" if endpoint else "the store"
        hint = f"cannot connect to {where}: check the network and -o endpoint_url=..."
        return RemoteUnavailableError(f"{what}: {_first_line(cause)}", hint=hint)
    return None


class _Unreached(RemoteUnavailableError):
    """Raised inside a client library (gcsfs) for a connection that could not be made, so that
    it is not retried there; :func:`remote_errors_as_ours` rephrases it for the operation."""


@contextmanager
def remote_errors_as_ours(what: str, fs: Any = None) -> Iterator[None]:
    """Raise a remote store's "cannot be used at all" failures as anyckpt's errors
    (:func:`remote_error`); other failures pass unchanged."""
    try:
        yield
    except CheckpointError as exc:
        if not isinstance(exc, _Unreached):
            raise
        raise remote_error(exc, what, fs) or exc from exc.__cause__
    except Exception as exc:
        ours = remote_error(exc, what, fs)
        if ours is None:
            raise
        raise ours from exc


def _gcsfs_fails_fast(fs: Any) -> None:
    """Make a gcsfs filesystem give up at once on a connection that cannot be made.

    gcsfs retries every aiohttp error six times over about 30 s, a refused connection or an
    unknown host too. This instance's requests go through gcsfs's own retry wrapper as before,
    but a connection that could not be made comes out of it as :class:`_Unreached`, which
    gcsfs does not retry (nor log a traceback for); everything else is retried as gcsfs does."""
    if getattr(fs, "_anyckpt_fails_fast", False):
        return
    plain = getattr(type(fs)._request, "__wrapped__", None)
    try:
        from aiohttp import ClientConnectorError
        from gcsfs.retry import retry_request
    except ImportError:  # pragma: no cover - gcsfs without aiohttp
        return
    if plain is None:  # pragma: no cover - a gcsfs without the decorator
        return

    async def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await plain(self, *args, **kwargs)
        except ClientConnectorError as exc:
            raise _Unreached(_first_line(exc)) from exc

    fs._request = retry_request(retries=fs.retries)(request).__get__(fs)
    fs._anyckpt_fails_fast = True
    # gcsfs's default class for gs:// first asks the bucket's layout over gRPC, retrying a
    # connection that fails for 60 s: not this one.
    control_retry = getattr(fs, "_get_retry_config", None)
    if callable(control_retry):

        def retry_config(**kwargs: Any) -> Any:
            policy = control_retry(**kwargs)
            transient = policy._predicate
            return policy.with_predicate(lambda exc: transient(exc) and not _grpc_unreachable(exc))

        fs._get_retry_config = retry_config


def _s3fs_fails_fast(fs: Any) -> None:
    """Make an s3fs filesystem give up at once on a connection that cannot be made.

    botocore retries a refused connection or an unknown host up to five times with growing
    pauses (15 s at worst). A handler of its ``needs-retry`` event, on this filesystem's
    session (for clients made later) and client, re-raises such a failure, which ends the
    request there; every other failure is retried as botocore's configuration says."""
    if getattr(fs, "_anyckpt_fails_fast", False):
        return
    try:
        fs.connect()  # makes the session and client; sends nothing
        emitters = [fs.session, fs.s3.meta.events]
    except Exception:  # an asynchronous or unusual instance: leave it as is
        return
    for emitter in emitters:
        emitter.register("needs-retry.s3", _raise_unreachable, unique_id="anyckpt-unreachable")
    fs._anyckpt_fails_fast = True


def _raise_unreachable(caught_exception: BaseException | None = None, **_: Any) -> None:
    """botocore ``needs-retry`` handler: no retry for a connection that could not be made."""
    if caught_exception is not None and is_unreachable(caught_exception):
        raise caught_exception


def _grpc_unreachable(exc: BaseException) -> bool:
    """A gRPC call that failed because no connection could be made (UNAVAILABLE: "failed to
    connect to all addresses", "DNS resolution failed")."""
    text = str(exc).lower()
    return "failed to connect" in text or "dns resolution failed" in text


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of an object store or network that may succeed if the same
    request is made again: timeouts, dropped connections, throttling (HTTP 429, S3 SlowDown)
    and server errors (HTTP 5xx). Everything else is permanent: missing or existing files,
    permissions, a full disk, I/O errors, anyckpt's own errors, and a connection that could
    not be made at all (:func:`is_unreachable`)."""
    permanent = (
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )
    if isinstance(exc, permanent) or is_unreachable(exc):
        return False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    for error in _chain(exc):  # the library's error and what it was raised from
        if _named(error, TRANSIENT_CLASS_NAMES):
            return True
        code = getattr(error, "code", None) or getattr(error, "status", None)
        if isinstance(code, int) and code in TRANSIENT_HTTP_STATUSES:
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in TRANSIENT_HTTP_STATUSES:
                return True
            if response.get("Error", {}).get("Code") in TRANSIENT_S3_CODES:
                return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How a whole-object operation on a remote filesystem is retried after a transient
    failure (:func:`is_transient`): at most ``attempts`` tries in all, sleeping between them
    for a random time up to ``base_delay * 2**(try - 1)``, capped at ``max_delay`` ("full
    jitter"). Permanent failures are raised at once. Local disk is never retried."""

    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def run(self, op: Callable[[], _T], what: str, fs: Any = None) -> _T:
        """``op()``, retried; a store that cannot be used at all (no credentials, cannot be
        reached) raises :func:`remote_error`'s error at once. ``fs``: the filesystem, to name
        its endpoint."""
        with remote_errors_as_ours(what, fs):
            return self._run(op, what)

    def _run(self, op: Callable[[], _T], what: str) -> _T:
        attempt = 1
        while True:
            try:
                return op()
            except Exception as exc:  # noqa: PERF203 - the loop is the retry
                if attempt >= self.attempts or not is_transient(exc):
                    raise
                pause = self.delay(attempt)
                logger.warning(
                    "%s failed (%s: %s); retry %d of %d in %.3f s",
                    what,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self.attempts - 1,
                    pause,
                )
                time.sleep(pause)
                attempt += 1


#: The policy new :class:`Storage` objects get.
DEFAULT_RETRY = RetryPolicy()


# -- conditional writes ----------------------------------------------------------------------


def content_version(data: Buffer) -> str:
    """The version token of a file on a store without native versions: its content's hash."""
    return "sha256:" + hashlib.sha256(_bytes_view(data)).hexdigest()


#: Serialises the check and the write of conditional operations on memory:// (a dictionary in
#: this process), which makes them atomic there; and on stores with no conditional requests.
_CONDITIONAL_LOCK = threading.Lock()


def _conflict(path: str, what: str) -> ConcurrentWriterError:
    return ConcurrentWriterError(f"{what}: another writer changed it", path=path)


def _s3_precondition_failed(exc: BaseException) -> bool:
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    return isinstance(response, dict) and (
        response.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}
        or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    )


class _S3Conditional:
    """Conditional requests on S3 (s3fs): ``If-None-Match: *`` creates, ``If-Match: ETAG``
    replaces and deletes; versions are ETags."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return bytes(data), str(response["ETag"])

        return fsspec.asyn.sync(self.fs.loop, get)  # type: ignore[no-any-return]

    def create(self, path: str, data: bytes) -> str:
        out = self.fs.pipe_file(path, data, mode="create")
        return str(out["ETag"])

    def replace(self, path: str, data: bytes, version: str) -> str:
        try:
            out = self.fs.pipe_file(path, data, IfMatch=version)
        except FileNotFoundError:
            raise _conflict(path, "replacing") from None
        except OSError as exc:
            if _s3_precondition_failed(exc):
                raise _conflict(path, "replacing") from None
            raise
        return str(out["ETag"])

    def remove(self, path: str, version: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            raise _conflict(path, "removing") from None
        except OSError as exc:
            if _s3_precondition_failed(exc):
                raise _conflict(path, "removing") from None
            raise
        finally:
            self.fs.invalidate_cache(path)


class _GCSConditional:
    """Conditional requests on GCS (gcsfs, JSON API): ``ifGenerationMatch=0`` creates,
    ``ifGenerationMatch=GENERATION`` replaces and deletes; versions are generations."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)
        headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        generation = headers.get("x-goog-generation") or headers.get("X-Goog-Generation")
        if not generation:  # emulators may not send it: ask for the object's metadata
            info = self.fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
            generation = info["generation"]
            _, data = self.fs.call(
                "GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation
            )
        return bytes(data), str(generation)

    def _upload(self, path: str, data: bytes, generation: str) -> str:
        bucket, key, _ = self.fs.split_path(path)
        try:
            out = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="media",
                name=key,
                ifGenerationMatch=generation,
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                json_out=True,
            )
        finally:
            self.fs.invalidate_cache(path)
        return str(out["generation"])

    def create(self, path: str, data: bytes) -> str:
        return self._upload(path, data, "0")  # FileExistsError (412) if it exists

    def replace(self, path: str, data: bytes, version: str) -> str:
        try:
            return self._upload(path, data, version)
        except (FileExistsError, FileNotFoundError):  # gcsfs: 412 is FileExistsError
            raise _conflict(path, "replacing") from None

    def remove(self, path: str, version: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            raise _conflict(path, "removing") from None
        finally:
            self.fs.invalidate_cache(path)


# -- the directory lock of local disk ------------------------------------------------------


class LocalLock:
    """An exclusive ``flock`` on a file, held until :meth:`release` or until the process ends
    (the kernel drops it when a process dies, even by SIGKILL). The holder writes who it is into
    the file, for the error message of the next contender. The file is removed on release while
    the lock is still held; a contender that locked a file removed meanwhile tries again."""

    def __init__(self, path: str) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            raise OSError(errno.ENOSYS, "flock is not available on this platform")
        self.path = path
        while True:
            fd = self._open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                current = self._is_current(fd)
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(errno.EEXIST, "locked by another writer", path) from None
            except BaseException:
                os.close(fd)  # (drops the lock, if it was taken)
                raise
            if current:
                break
            os.close(fd)  # the holder removed it between our open and our lock
        self._fd: int | None = fd
        # A lock dropped without release() (its manager abandoned) is freed with it.
        self._close = weakref.finalize(self, os.close, fd)

    @staticmethod
    def _open(path: str) -> int:
        """Open (create) the lock file, written in place: never through a symbolic link
        (O_NOFOLLOW; dangling ones included), and only a regular file with one link, so that
        nothing outside the directory is ever truncated or written. Anything else planted
        there raises UnsafePathError, and nothing is changed."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _SAFE_OPEN, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                with suppress(OSError):
                    what = _kind(os.lstat(path).st_mode)
                    raise UnsafePathError(
                        f"refusing to use this lock file: it is {what}", path=path
                    ) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(
                    f"refusing to use this lock file: it is {_kind(st.st_mode)}", path=path
                )
            if st.st_nlink > 1:
                raise UnsafePathError(
                    f"refusing to use this lock file: it has {st.st_nlink} hard links (another "
                    "name, maybe outside the directory, shares its contents)",
                    path=path,
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def available() -> bool:
        return fcntl is not None

    def _is_current(self, fd: int) -> bool:
        try:
            now = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def held(self) -> bool:
        """Whether the lock is still ours: not released, and its file not removed or replaced
        by someone else."""
        return self._fd is not None and self._is_current(self._fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._is_current(fd):
                with suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            self._close()  # closing drops the flock

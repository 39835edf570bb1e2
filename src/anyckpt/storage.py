"""The one module that touches files: fsspec filesystems, with a fast path for local disk.

Everything here is synchronous and thread-safe; the async layers above call it from worker
threads (``anyio.to_thread``), one thread per shard, so writes, reads and CRCs (which release
the GIL) run concurrently. Remote filesystems (s3fs, gcsfs) run their own event loop in
fsspec's I/O thread, which keeps this usable under both asyncio and trio.

* Writes are atomic per file. Local: a temporary name in the same directory, ``fsync`` when
  durable, then ``rename``. Object stores: one object, made visible only when the upload
  completes (a single PUT or a completed multipart upload); an aborted upload is discarded.
* Tensor bytes are written from the caller's buffers (no copy on the local path) and read
  straight into destination arrays (``preadv``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from .errors import CheckpointNotFoundError, CorruptCheckpointError

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: Marker in the names of files being written; what is left of a crash carries it.
TEMP_MARKER = ".anyckpt-tmp-"


def _iov_max() -> int:
    """Most buffers one writev/preadv call takes (IOV_MAX, 1024 on Linux)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 16
    return min(n, 1024) if n > 0 else 16


_IOV_MAX = _iov_max()


def _bytes_view(buffer: Buffer) -> memoryview:
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class FileWriter(Protocol):
    """A file being written; nothing is visible under its name before :meth:`commit`."""

    path: str

    def write(self, data: Buffer) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class FileReader(Protocol):
    """Random access to one file of known size."""

    path: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...
    def read_into(self, offset: int, buffer: Buffer) -> None: ...
    def close(self) -> None: ...


class _LocalWriter:
    def __init__(self, path: str, durable: bool) -> None:
        self.path = path
        self._durable = durable
        self._tmp = f"{path}{TEMP_MARKER}{secrets.token_hex(4)}"
        self._fd: int | None = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644
        )

    def write(self, data: Buffer) -> None:
        assert self._fd is not None
        view = _bytes_view(data)
        while view.nbytes:
            written = os.write(self._fd, view)
            view = view[written:]

    def write_many(self, buffers: list[memoryview]) -> None:
        """Write byte views back to back, up to IOV_MAX per system call (``writev``): many
        small tensors cost a few calls, and nothing is copied into a staging buffer."""
        assert self._fd is not None
        if not hasattr(os, "writev"):
            for view in buffers:
                self.write(view)
            return
        views = [v for v in buffers if v.nbytes]
        while views:
            batch = views[:_IOV_MAX]
            written = os.writev(self._fd, batch)
            # Drop what was written; a short write leaves the rest of one view to redo.
            done = 0
            for view in batch:
                if written < view.nbytes:
                    break
                written -= view.nbytes
                done += 1
            views = views[done:]
            if written:
                views[0] = views[0][written:]

    def commit(self) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
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
        self._file = fs.open(self._target, "wb")

    def write(self, data: Buffer) -> None:
        self._file.write(_bytes_view(data))

    def commit(self) -> None:
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


class _LocalReader:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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

    def close(self) -> None:
        os.close(self._fd)


class _FsspecReader:
    def __init__(self, fs: Any, path: str) -> None:
        self.path = path
        self._fs = fs
        self.size = int(fs.size(path))

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
            data = bytes(self._fs.cat_file(self.path, start=offset, end=offset + length))
        if len(data) != length:
            raise CorruptCheckpointError("short read", path=self.path)
        return data

    def read_into(self, offset: int, buffer: Buffer) -> None:
        view = _bytes_view(buffer)
        view[:] = self.read(offset, view.nbytes)

    def close(self) -> None:
        pass


@contextmanager
def _not_found_as_ours(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise CheckpointNotFoundError("no such file", path=path) from None
        raise


class Storage:
    """A filesystem and the operations anyckpt needs from it. Paths are the filesystem's own
    (no protocol); :meth:`url` turns one back into a URL for messages."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.is_local = isinstance(fs, LocalFileSystem)

    @classmethod
    def from_url(
        cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> tuple[Storage, str]:
        """The storage for a local path or fsspec URL, and the path within it."""
        fs, path = fsspec.core.url_to_fs(os.fspath(url), **(storage_options or {}))
        storage = cls(fs)
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
        return _FsspecWriter(self.fs, path)

    def write_bytes(self, path: str, data: Buffer, *, durable: bool = True) -> None:
        writer = self.open_writer(path, durable=durable)
        try:
            writer.write(data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def sync_directory(self, path: str) -> None:
        """Make renames in a local directory durable (no-op on object stores)."""
        if not self.is_local:
            return
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> bool:
        """Delete one file; return False if it was already gone."""
        try:
            if self.is_local:
                os.unlink(path)
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
                return _LocalReader(path)
            return _FsspecReader(self.fs, path)

    def read_bytes(self, path: str, *, max_size: int | None = None) -> bytes:
        """The whole file; refuse (CorruptCheckpointError) one larger than ``max_size``."""
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

    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        return bool(self.fs.exists(path))

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the files directly in a directory; [] if it does not exist."""
        if self.is_local:
            try:
                return sorted(os.listdir(path))
            except FileNotFoundError:
                return []
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


def _is_object_store(fs: Any) -> bool:
    """s3fs or gcsfs: listings are cached, and a file being written is invisible until closed."""
    return type(fs).__module__.split(".")[0] in {"s3fs", "gcsfs"}

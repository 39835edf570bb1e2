"""Local disk: the fast path. Every open refuses symbolic links at the last component
(``O_NOFOLLOW``) and FIFOs; whole tensors are written from the caller's buffers (``writev``)
and read into the destination arrays (``preadv``); a durable write is ``fsync``-ed, renamed
over its name and its directory ``fsync``-ed.

Every system call goes through this module's ``os`` attribute (never ``from os import``), so
that tests can replace it to inject faults or record what a power cut could lose."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import posixpath
import secrets
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, UnsafePathError
from .base import (
    NBYTES,
    TEMP_MARKER,
    Backend,
    FileReader,
    FileStat,
    FileWriter,
    PathKind,
    ReaderBase,
    WriterBase,
    bytes_view,
    content_version,
    not_found_as_ours,
    views_for,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .retry import RetryPolicy


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


#: Flags of every local open: never follow a symbolic link at the last component, never
#: block on a FIFO planted under a checkpoint's name, and close on exec.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
SAFE_OPEN = NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


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
            f"refusing to write: the name is taken by {file_kind(st.st_mode)}, not a regular file",
            path=path,
        )


def file_kind(mode: int) -> str:
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


class LocalWriter(WriterBase):
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
                fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o644)
                break
            except FileExistsError:
                if attempt == _TEMP_NAME_TRIES - 1:
                    raise
        self._fd: int | None = fd
        self._end = 0  # bytes written
        self._sent = 0  # bytes whose writeback was started

    def write(self, data: Buffer) -> None:
        assert self._fd is not None
        view = bytes_view(data)
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
            if written == sum(map(NBYTES, batch)):  # the usual case: all of it
                views = views[_IOV_MAX:]
                continue
            # A short write: drop what was written, redo the rest of the view it stopped in.
            done = 0
            for view in batch:
                size = NBYTES(view)
                if written < size:
                    break
                written -= size
                done += 1
            views = views[done:]
            if written:
                views[0] = bytes_view(views[0])[written:]
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


def open_for_reading(path: str, allow_symlinks: bool) -> int:
    """Open local ``path`` to read it: a regular file, or a symbolic link whose target stays
    inside the file's directory (any link with ``allow_symlinks``). A link leaving the
    directory raises UnsafePathError; a directory, FIFO or device CorruptCheckpointError."""
    try:
        fd = os.open(path, os.O_RDONLY | SAFE_OPEN)
    except OSError as exc:
        if exc.errno != errno.ELOOP or not NOFOLLOW:
            raise
        if allow_symlinks:
            fd = os.open(path, os.O_RDONLY | (SAFE_OPEN & ~NOFOLLOW))
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
                fd = os.open(target, os.O_RDONLY | SAFE_OPEN)
            except OSError as again:
                if again.errno == errno.ELOOP:
                    raise UnsafePathError("a loop of symbolic links", path=path) from None
                raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CorruptCheckpointError(f"{file_kind(mode)}, not a regular file", path=path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LocalReader(ReaderBase):
    def __init__(self, path: str, allow_symlinks: bool = False) -> None:
        self.path = path
        self._fd = open_for_reading(path, allow_symlinks)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"read of {length} bytes at offset {offset} is past the end of the file "
                f"({self.size} bytes)",
                path=self.path,
            )
        # One pread makes the bytes in place (a buffer filled and then copied into bytes held
        # twice the length: a 52 MB index was read at a 104 MB peak); a short read (a file
        # that shrank, or a read past Linux's 2 GiB per call) takes the general loop.
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        del data
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buffer: Buffer) -> None:
        view = bytes_view(buffer)
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

    def read_into_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
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
        views = views_for(ranges)
        self.read_ranges_into([(o, v) for (o, _), v in zip(ranges, views, strict=True)])
        return views

    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        for offset, buffer in requests:  # one preadv each: no round trips to save locally
            self.read_into(offset, buffer)

    def close(self) -> None:
        os.close(self._fd)


class LocalBackend(Backend):
    """Local disk (fsspec's ``LocalFileSystem``): system calls, no retries (a local failure
    does not go away by itself)."""

    cheap_small_reads = True
    plain_paths = True
    supports_flock = sys.platform != "win32"

    def __init__(self, fs: Any, retry: RetryPolicy, allow_symlinks: bool) -> None:
        super().__init__(fs, retry, allow_symlinks)

    def normalize(self, path: str) -> str:
        return os.path.abspath(path)

    def url(self, path: str) -> str:
        return path

    def retrying(self, op: Callable[[], Any], what: str) -> Any:
        return op()

    def open_writer(self, path: str, durable: bool) -> FileWriter:
        return LocalWriter(path, durable)

    def write_pieces(self, path: str, pieces: Iterable[Buffer], durable: bool) -> None:
        """Each piece written as it comes (no retries here: nothing to write again)."""
        writer = self.open_writer(path, durable)
        try:
            for piece in pieces:
                writer.write(piece)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its missing parents, each made durable in its parent (an
        ``fsync`` of the parent after the ``mkdir``): without it a power cut after the first
        committed save into a new directory could lose the whole directory."""
        missing = []
        current = os.path.abspath(path)
        while not os.path.isdir(current):
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise
                continue  # another process made it (and made it durable)
            self.sync_directory(os.path.dirname(directory))

    def sync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def check_replaceable(self, path: str) -> None:
        check_replaceable(path)

    def remove(self, path: str) -> bool:
        try:
            os.unlink(path)  # a link itself, never what it points to
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise UnsafePathError(
                "a directory where a checkpoint file belongs: not removing it", path=path
            ) from None
        return True

    def open_reader(self, path: str) -> FileReader:
        with not_found_as_ours(path):
            return LocalReader(path, self.allow_symlinks)

    def read_bytes(self, path: str, max_size: int | None) -> bytes:
        """The open file is read: one version of it, even while it is being replaced."""
        reader = self.open_reader(path)
        try:
            if max_size is not None and reader.size > max_size:
                raise CorruptCheckpointError(
                    f"file is {reader.size} bytes, more than the {max_size} allowed", path=path
                )
            return reader.read(0, reader.size)
        finally:
            reader.close()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def path_kind(self, path: str) -> PathKind:
        if os.path.isdir(path):
            return "dir"
        return "file" if os.path.exists(path) else "none"

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_files(self, root: str) -> list[FileStat] | None:
        if not os.path.isdir(root):
            return None
        found = []
        with os.scandir(root) as it:
            for entry in it:
                if entry.is_file():
                    st = entry.stat()
                    found.append(FileStat(entry.name, st.st_size, st.st_mtime))
        return sorted(found, key=lambda f: f.name)

    def subdirectories(self, root: str) -> list[str]:
        found: list[str] = []
        for here, dirs, _ in os.walk(root):
            dirs.sort()
            found += [os.path.join(here, d) for d in dirs]
        return sorted(found)

    def read_versioned(self, path: str, max_size: int | None) -> tuple[bytes, str]:
        data = self.read_bytes(path, max_size)
        return data, content_version(data)

    def create_exclusive(self, path: str, data: bytes, durable: bool) -> str:
        """Write a temporary file, then hard-link it to ``path``: the link fails if ``path``
        exists, so the file appears complete or not at all, and only once."""
        tmp = f"{path}{TEMP_MARKER}{secrets.token_hex(4)}"
        writer = LocalWriter(tmp, durable)
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

    def replace_if(self, path: str, data: bytes, version: str, durable: bool) -> str:
        """Checks, then writes: the directory lock keeps other anyckpt writers out."""
        self.check_version(path, version, "replacing")
        self.write_bytes(path, data, durable)
        return content_version(data)

    def remove_if(self, path: str, version: str) -> None:
        self.check_version(path, version, "removing")
        self.remove(path)

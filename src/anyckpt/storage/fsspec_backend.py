"""Any fsspec filesystem (memory://, and what has no backend of its own), and what object
stores add to it (:class:`ObjectStoreBackend`: uncached listings, uploads visible only when
complete, conditional requests)."""

from __future__ import annotations

import errno
import posixpath
import secrets
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fsspec.spec import AbstractBufferedFile

from ..errors import CheckpointNotFoundError, ConcurrentWriterError, CorruptCheckpointError
from .base import (
    TEMP_MARKER,
    Backend,
    FileReader,
    FileStat,
    FileWriter,
    PathKind,
    ReaderBase,
    WriterBase,
    bytes_view,
    coalesce,
    content_version,
    not_found_as_ours,
)
from .remote_errors import remote_errors_as_ours

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .retry import RetryPolicy


def _range_not_satisfiable(exc: OSError) -> bool:
    """S3's (and s3fs's) answer to a range on an empty object: HTTP 416, as EINVAL."""
    text = str(exc).lower()
    return exc.errno == errno.EINVAL or "not satisfiable" in text or "invalidrange" in text


class FsspecWriter(WriterBase):
    """Object stores (``direct``: s3fs, gcsfs): one upload, visible only when ``close()``
    completes it. Other fsspec filesystems (memory://, ...) may show a file from ``open()``
    on, so they get a temporary name that is moved over the target on commit."""

    def __init__(self, fs: Any, path: str, direct: bool) -> None:
        self.path = path
        self._fs = fs
        self._direct = direct
        self._target = path if self._direct else f"{path}{TEMP_MARKER}{secrets.token_hex(4)}"
        self._what = f"writing {fs.unstrip_protocol(path)}"
        with remote_errors_as_ours(self._what, fs):
            self._file = fs.open(self._target, "wb")

    def write(self, data: Buffer) -> None:
        with remote_errors_as_ours(self._what, self._fs):
            self._file.write(bytes_view(data))

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


class FsspecReader(ReaderBase):
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
        with not_found_as_ours(str(self._fs.unstrip_protocol(self.path))):  # deleted since
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
        view = bytes_view(buffer)
        view[:] = self.read(offset, view.nbytes)

    def read_ranges_into(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        views = [bytes_view(buffer) for _, buffer in requests]
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

        with not_found_as_ours(str(self._fs.unstrip_protocol(self.path))):
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


def _mtime(entry: dict[str, Any]) -> float | None:
    """A listing entry's modification time, under whichever key its filesystem uses."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


#: Serialises the check and the write of conditional operations on memory:// (a dictionary in
#: this process), which makes them atomic there; and on stores with no conditional requests.
CONDITIONAL_LOCK = threading.Lock()


def declares_object_store(fs: Any) -> bool:
    """s3fs or gcsfs: listings are cached, and a file being written is invisible until closed.
    A filesystem (a wrapper, a test double) may say so with ``anyckpt_object_store = True``."""
    declared = getattr(fs, "anyckpt_object_store", None)
    if isinstance(declared, bool):
        return declared
    return type(fs).__module__.split(".")[0] in {"s3fs", "gcsfs"}


class FsspecBackend(Backend):
    """Any fsspec filesystem: whole-object operations retried after transient failures.
    ``object_store``: listings are cached by the filesystem (asked afresh here, and dropped),
    deleting a missing object succeeds (so asked first), and a file being written is invisible
    until closed (written under its own name, not a temporary one)."""

    def __init__(self, fs: Any, retry: RetryPolicy, allow_symlinks: bool) -> None:
        super().__init__(fs, retry, allow_symlinks)
        self.object_store = declares_object_store(fs)

    def open_writer(self, path: str, durable: bool) -> FileWriter:
        return FsspecWriter(self.fs, path, self.object_store)

    def remove(self, path: str) -> bool:
        return self.retrying(lambda: self._remove(path), f"removing {self.url(path)}")

    def _remove(self, path: str) -> bool:
        try:
            if self.object_store and not self.fs.exists(path):
                return False  # deleting a missing object succeeds on S3: ask first
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def open_reader(self, path: str) -> FileReader:
        with not_found_as_ours(self.url(path)):
            return FsspecReader(self.fs, path, self.retry)

    def read_bytes(self, path: str, max_size: int | None) -> bytes:
        """In one request: a size, then a range, could straddle two versions."""
        return self.retrying(lambda: self._read_whole(path, max_size), f"reading {self.url(path)}")

    def _read_whole(self, path: str, max_size: int | None) -> bytes:
        def too_big(size: int | None) -> CorruptCheckpointError:
            found = "more" if size is None else f"{size} bytes, more"
            return CorruptCheckpointError(
                f"file is {found} than the {max_size} allowed", path=self.url(path)
            )

        with not_found_as_ours(self.url(path)):
            if max_size is None:
                data = bytes(self.fs.cat_file(path))
            else:
                try:
                    # One ranged GET of one byte more than allowed: it tells "too big" without
                    # a HEAD for the size first (which doubled the requests on object stores).
                    data = bytes(self.fs.cat_file(path, start=0, end=max_size + 1))
                except OSError as exc:
                    if not _range_not_satisfiable(exc):
                        raise
                    # An empty object: S3 answers any range on it "not satisfiable" (416).
                    size = int(self.fs.size(path))
                    if size > max_size:
                        raise too_big(size) from None
                    data = bytes(self.fs.cat_file(path))
        if max_size is not None and len(data) > max_size:
            raise too_big(None)
        return data

    def exists(self, path: str) -> bool:
        return self.retrying(lambda: bool(self.fs.exists(path)), f"looking for {self.url(path)}")

    def isfile(self, path: str) -> bool:
        try:
            return bool(self.fs.isfile(path))
        except (OSError, ValueError):
            return False

    def path_kind(self, path: str) -> PathKind:
        """One ``info`` (on an object store: a HEAD, then a one-key listing if no object has
        that name), not ``isdir`` and ``isfile`` (two listings and two HEADs on S3)."""
        try:
            with remote_errors_as_ours(f"looking for {self.url(path)}", self.fs):
                kind = self.fs.info(path).get("type")
        except (OSError, ValueError):  # (a store that cannot be used at all raised above)
            return "none"
        return "dir" if kind == "directory" else "file" if kind == "file" else "none"

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def listdir(self, path: str) -> list[str]:
        return self.retrying(lambda: self._listdir(path), f"listing {self.url(path)}")

    def _listdir(self, path: str) -> list[str]:
        try:
            if self.object_store:
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

    def list_files(self, root: str) -> list[FileStat] | None:
        fs = self.fs
        with suppress(Exception):  # best effort: listings may be cached
            fs.invalidate_cache(root)
        try:
            with remote_errors_as_ours(f"listing {self.url(root)}", fs):
                entries = fs.ls(root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        found = []
        for entry in entries:
            name = posixpath.basename(str(entry.get("name", "")).rstrip("/"))
            if entry.get("type") == "directory" or not name:
                continue
            if name == posixpath.basename(root) and len(entries) == 1 and fs.isfile(root):
                return None  # ``root`` is a file
            size = entry.get("size")
            found.append(FileStat(name, int(size) if size is not None else None, _mtime(entry)))
        return sorted(found, key=lambda f: f.name)

    def subdirectories(self, root: str) -> list[str]:
        found: list[str] = []
        for here, dirs, _ in self.fs.walk(root):
            found += [posixpath.join(here, d) for d in sorted(dirs)]
        return sorted(found)

    # -- conditional operations: check and act under a lock of this process ----------------
    def read_versioned(self, path: str, max_size: int | None) -> tuple[bytes, str]:
        data = self.read_bytes(path, max_size)
        return data, content_version(data)

    def create_exclusive(self, path: str, data: bytes, durable: bool) -> str:
        with CONDITIONAL_LOCK:
            if self.fs.exists(path):
                raise FileExistsError(errno.EEXIST, "exists", self.url(path))
            self.write_bytes(path, data, durable)
        return content_version(data)

    def replace_if(self, path: str, data: bytes, version: str, durable: bool) -> str:
        with CONDITIONAL_LOCK:
            self.check_version(path, version, "replacing")
            self.write_bytes(path, data, durable)
        return content_version(data)

    def remove_if(self, path: str, version: str) -> None:
        with CONDITIONAL_LOCK:
            self.check_version(path, version, "removing")
            self.remove(path)


class Conditional:
    """A store's conditional requests: version tokens, and writes that apply only if the
    object is still at a version (or absent)."""

    def read(self, path: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def create(self, path: str, data: bytes) -> str:
        raise NotImplementedError

    def replace(self, path: str, data: bytes, version: str) -> str:
        raise NotImplementedError

    def remove(self, path: str, version: str) -> None:
        raise NotImplementedError


class ObjectStoreBackend(FsspecBackend):
    """An object store with conditional requests (S3, GCS): the manager's lock and state
    file are written atomically against other processes."""

    atomic_conditional_writes = True

    def __init__(
        self, fs: Any, retry: RetryPolicy, allow_symlinks: bool, conditional: Conditional
    ) -> None:
        super().__init__(fs, retry, allow_symlinks)
        self.object_store = True
        self.conditional = conditional

    def read_versioned(self, path: str, max_size: int | None) -> tuple[bytes, str]:
        def read() -> tuple[bytes, str]:
            with not_found_as_ours(self.url(path)):
                return self.conditional.read(path)

        data, version = self.retrying(read, f"reading {self.url(path)}")
        if max_size is not None and len(data) > max_size:
            raise CorruptCheckpointError(
                f"file is {len(data)} bytes, more than the {max_size} allowed", path=self.url(path)
            )
        return data, version

    def create_exclusive(self, path: str, data: bytes, durable: bool) -> str:
        return self._conditionally(path, data, lambda: self.conditional.create(path, data))

    def replace_if(self, path: str, data: bytes, version: str, durable: bool) -> str:
        return self._conditionally(
            path, data, lambda: self.conditional.replace(path, data, version)
        )

    def remove_if(self, path: str, version: str) -> None:
        self.retrying(lambda: self.conditional.remove(path, version), f"removing {self.url(path)}")

    def _conditionally(self, path: str, data: bytes, op: Callable[[], str]) -> str:
        """A conditional write, retried like the others. A try may be applied although its
        answer was lost (a timeout); the next try, here or inside the client library (s3fs
        and gcsfs retry requests themselves), then finds the precondition broken. So a broken
        precondition is checked: the file holding exactly ``data`` proves the write done."""
        try:
            return self.retrying(op, f"writing {self.url(path)}")
        except (FileExistsError, ConcurrentWriterError):
            with suppress(CheckpointNotFoundError):
                current, version = self.read_versioned(path, None)
                if current == data:
                    return version
            raise

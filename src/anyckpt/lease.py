"""The lock a :class:`~anyckpt.CheckpointManager` holds on its directory: one writer at a time.

Two managers writing one directory would each rewrite the state file with their own list of
checkpoints, let retention delete the other's checkpoints, and clean up the other's save in
flight as debris. So a manager takes the directory's lock (the file ``checkpoint.lock``) before
it reads or changes anything there, and a second one fails with
:class:`~anyckpt.ConcurrentWriterError`, naming the holder.

* Local disk: an exclusive ``flock`` on the file (:class:`LocalLock`). The
  kernel drops it when the holder's process ends, however it ends, so a crashed writer never
  blocks its successor.
* Object stores and other filesystems: a *lease*, an object naming its holder, created only if
  absent (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), renewed every quarter of its
  term by a background thread with a conditional write against the version the holder last
  wrote (S3 ``If-Match``, GCS ``ifGenerationMatch``), and deleted on release. A lease whose
  holder is provably gone (same machine, process no longer running) is taken over at once.
  Otherwise the contender watches it: a renewal (within a quarter term, if the holder is
  alive) fails the contender with ConcurrentWriterError; a lease left unchanged for a whole
  term belonged to a dead holder and is taken over (a conditional write against the version
  watched, so of two contenders only one wins). Only versions and this process's monotonic
  clock decide, so clock skew between hosts never breaks a live lease.

The holder re-confirms its lock right before each state-file write (a conditional renewal on
object stores); losing it fails the save with ConcurrentWriterError instead of committing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import secrets
import socket
import stat
import sys
import threading
import time
import weakref
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConcurrentWriterError,
    CorruptCheckpointError,
    UnsafePathError,
)
from .storage import Storage
from .storage.local import SAFE_OPEN, file_kind

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover
    fcntl = None

__all__ = ["LOCK_FILE", "DirectoryLock", "LocalLock", "LockInfo", "read_lock"]

#: Name of the lock file in a checkpoint directory.
LOCK_FILE = "checkpoint.lock"
#: Largest lock file that is read.
_MAX_LOCK_BYTES = 64 << 10
#: How long a contender waits for a local lock's holder to name itself in the file.
_NAMING_GRACE_SECONDS = 1.0

logger = logging.getLogger("anyckpt.lease")


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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | SAFE_OPEN, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                with suppress(OSError):
                    what = file_kind(os.lstat(path).st_mode)
                    raise UnsafePathError(
                        f"refusing to use this lock file: it is {what}", path=path
                    ) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(
                    f"refusing to use this lock file: it is {file_kind(st.st_mode)}", path=path
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
        """Whether this platform has ``flock``."""
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


def _machine_id() -> str:
    """This machine's boot and PID namespace: processes that share it can check on each other
    with ``kill(pid, 0)``; anything else (another host, container or boot) cannot."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("no-proc")  # never provably the same machine: leases only expire
        parts.append(secrets.token_hex(8))
    return "/".join(parts)


#: This process's machine identity (see :func:`_machine_id`).
MACHINE = _machine_id()

#: Locks held by this process, by lock-file URL: a second manager of the same process on the
#: same directory fails at once, whatever the filesystem.
_HELD: dict[str, weakref.ref[DirectoryLock]] = {}
_HELD_GUARD = threading.Lock()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "a writer whose lock file is empty or unreadable"
    since = holder.get("acquired")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        if isinstance(since, (int, float))
        else "?"
    )
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {when})"


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class DirectoryLock:
    """The lock of one checkpoint directory, for one manager. Every method is blocking (the
    manager runs them in worker threads)."""

    def __init__(self, storage: Storage, root: str, *, lease_seconds: float = 60.0) -> None:
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        self.storage = storage
        self.path = posixpath.join(root, LOCK_FILE)
        self.url = storage.url(self.path)
        self.lease_seconds = float(lease_seconds)
        self.owner = secrets.token_hex(16)
        self._local: LocalLock | None = None
        self._version: str | None = None  # the lease's version as we last wrote it
        self._renewed = 0.0  # time.monotonic() of the last successful renewal
        self._lost: ConcurrentWriterError | None = None
        self._guard = threading.Lock()  # renewals: the heartbeat and confirm()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._acquired = False
        self._since = time.time()

    # -- taking it ---------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or raise ConcurrentWriterError naming its holder."""
        with _HELD_GUARD:
            other = _HELD.get(self.url)
            if other is not None and other() is not None:
                raise ConcurrentWriterError(
                    "another CheckpointManager of this process has this directory open",
                    path=self.url,
                )
            _HELD[self.url] = weakref.ref(self)
        try:
            self.storage.makedirs(posixpath.dirname(self.path))
            if self.storage.supports_flock:
                self._acquire_local()
            else:
                self._acquire_lease()
        except BaseException:
            self._forget()
            raise
        self._acquired = True

    def _acquire_local(self) -> None:
        # A holder names itself in the file right after taking the flock, so a contender can
        # find the lock held and the file still empty (or the lock just released and taken
        # by a newcomer): it looks again for a moment, trying the lock each time, before it
        # reports an unnamed holder.
        deadline = time.monotonic() + _NAMING_GRACE_SECONDS
        while True:
            try:
                self._local = LocalLock(self.path)
                break
            except FileExistsError:
                holder = None
                with contextlib.suppress(OSError, CheckpointError):
                    holder = _parse(self.storage.read_bytes(self.path, max_size=_MAX_LOCK_BYTES))
                if holder is not None or time.monotonic() >= deadline:
                    raise self._held_by(holder) from None
                time.sleep(0.01)
        try:
            self._local.write(self._info())
        except BaseException:
            self._local.release()
            self._local = None
            raise

    def _info(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "anyckpt": "directory lock",
                "owner": self.owner,
                "host": socket.gethostname(),
                "machine": MACHINE,
                "pid": os.getpid(),
                "acquired": self._since,
                "renewed": now,
                "expires": now + self.lease_seconds,
            }
        ).encode()

    def _held_by(self, holder: dict[str, Any] | None, how: str = "") -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"the directory is locked by {_describe(holder)}{how}: two managers writing one "
            "directory would delete each other's checkpoints",
            path=self.url,
        )

    def _gone(self, holder: dict[str, Any]) -> bool:
        """Whether the holder is provably no longer running (same machine, dead process)."""
        if holder.get("machine") != MACHINE or not isinstance(holder.get("pid"), int):
            return False
        if holder["pid"] == os.getpid():  # a manager of this process that never released it
            with _HELD_GUARD:
                return not any(
                    (lock := ref()) is not None and lock.owner == holder.get("owner")
                    for ref in _HELD.values()
                )
        return not _pid_running(holder["pid"])

    def _acquire_lease(self) -> None:
        for _ in range(100):  # only a lock that keeps vanishing and reappearing runs this out
            try:
                self._version = self.storage.create_exclusive(self.path, self._info())
                break
            except FileExistsError:
                pass
            try:
                data, version = self.storage.read_versioned(self.path, max_size=_MAX_LOCK_BYTES)
            except CheckpointNotFoundError:
                continue  # released meanwhile
            except CorruptCheckpointError:
                raise self._held_by(None) from None
            holder = _parse(data)
            if holder is not None and self._gone(holder):
                logger.warning("%s: taking over the lock of %s", self.url, _describe(holder))
                self._take_over(holder, version)
                break
            if self._watch(holder, version):
                break
        else:
            raise ConcurrentWriterError("the lock keeps changing hands", path=self.url)
        self._renewed = time.monotonic()
        self._start_heartbeat()

    def _watch(self, holder: dict[str, Any] | None, version: str) -> bool:
        """Watch a lease held by someone who may be alive, for up to a whole term. Renewed
        meanwhile (a live holder renews every quarter term): ConcurrentWriterError. Unchanged
        for a whole term: its holder is gone, take it over (True). Released: False.

        Clocks are not compared: only this process's monotonic clock and the lease's version
        decide, so clock skew between hosts cannot break a live lease."""
        expires = holder.get("expires") if holder is not None else None
        logger.warning(
            "%s: locked by %s (%s); watching it for up to %g s for a renewal",
            self.url,
            _describe(holder),
            "lease expired by our clock"
            if isinstance(expires, (int, float)) and expires < time.time()
            else "lease current by our clock",
            self.lease_seconds,
        )
        start = time.monotonic()
        while time.monotonic() - start < self.lease_seconds:
            time.sleep(min(self.lease_seconds / 8, 1.0))
            try:
                _, now = self.storage.read_versioned(self.path, max_size=_MAX_LOCK_BYTES)
            except CheckpointNotFoundError:
                return False
            if now != version:
                raise self._held_by(holder, ", which renewed it")
        self._take_over(holder, version)
        return True

    def _take_over(self, holder: dict[str, Any] | None, version: str) -> None:
        try:
            self._version = self.storage.replace_if(self.path, self._info(), version)
        except ConcurrentWriterError:
            raise self._held_by(holder, " or whoever took it over first") from None

    # -- keeping it --------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        ref = weakref.ref(self)
        stop = self._stop
        interval = self.lease_seconds / 4

        def beat() -> None:
            while not stop.wait(interval):
                lock = ref()
                if lock is None or lock._lost is not None:
                    return
                lock._beat()
                del lock

        self._heartbeat = threading.Thread(target=beat, name="anyckpt-lease", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        try:
            self._renew()
        except ConcurrentWriterError:
            return  # recorded in _lost by _renew
        except Exception as exc:
            overdue = time.monotonic() - self._renewed
            logger.warning("%s: renewing the lock failed (%r)", self.url, exc)
            if overdue > self.lease_seconds * 0.75:
                self._lost = ConcurrentWriterError(
                    f"the lock could not be renewed for {overdue:.0f} s; another writer may "
                    "have taken the directory over",
                    path=self.url,
                )

    def _renew(self) -> None:
        with self._guard:
            if self._lost is not None:
                raise self._lost
            try:
                self._version = self.storage.replace_if(self.path, self._info(), self._version)
            except ConcurrentWriterError:
                self._lost = ConcurrentWriterError(
                    "another writer took the directory's lock over: this manager no longer "
                    "owns the directory and commits nothing more",
                    path=self.url,
                )
                raise self._lost from None
            self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise ConcurrentWriterError if the lock is known to be lost (no I/O)."""
        if self._lost is not None:
            raise self._lost
        if not self._acquired:
            raise ConcurrentWriterError("the directory lock is not held", path=self.url)

    def confirm(self) -> None:
        """Make sure the lock is still ours right now (before a commit).

        Local disk: the lock file is still the one we hold. A lease: renewed less than half
        a term ago, it cannot have been taken over (a contender takes over only a lease it saw
        unchanged for a whole term, or whose holder's process is gone), so the heartbeat's
        last renewal vouches for it; otherwise it is renewed now, against its last version."""
        self.check()
        if self._local is not None:
            if not self._local.held():
                self._lost = ConcurrentWriterError(
                    "the lock file was removed or replaced by someone else", path=self.url
                )
                raise self._lost
            return
        if time.monotonic() - self._renewed < self.lease_seconds / 2:
            return
        self._renew()

    # -- giving it back ----------------------------------------------------------------------

    def release(self) -> None:
        """Give the lock back (best effort: a lease left behind expires)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        try:
            if self._local is not None:
                self._local.release()
            elif self._acquired and self._lost is None and self._version is not None:
                with self._guard:
                    self.storage.remove_if(self.path, self._version)
        except (ConcurrentWriterError, CheckpointNotFoundError):
            pass
        except Exception as exc:
            logger.warning(
                "%s: releasing the lock failed (%r); it expires by itself", self.url, exc
            )
        finally:
            self._acquired = False
            self._forget()

    def _forget(self) -> None:
        with _HELD_GUARD:
            ref = _HELD.get(self.url)
            if ref is not None and ref() in (self, None):
                del _HELD[self.url]


# -- reading a lock (for ``anyckpt ls``) -----------------------------------------------------


@dataclass(frozen=True)
class LockInfo:
    """A ``checkpoint.lock`` found in a directory: who holds it and what the next
    :class:`~anyckpt.CheckpointManager` opening the directory will do about it."""

    url: str
    holder: dict[str, Any] | None  # the holder's record (None: empty or unreadable)
    lease: bool  # an object-store lease (else a local flock)
    running: bool | None  # the holder's process is running (None: another machine)
    expired: bool | None  # the lease's term has passed by this clock (None: local lock)
    next_open: str  # what the next manager opening the directory does

    @property
    def holder_text(self) -> str:
        return _describe(self.holder)


def read_lock(storage: Storage, root: str, now: float | None = None) -> LockInfo | None:
    """The lock file of the directory ``root``, read (never taken); None if there is none."""
    path = posixpath.join(root, LOCK_FILE)
    now = time.time() if now is None else now
    try:
        holder = _parse(storage.read_bytes(path, max_size=_MAX_LOCK_BYTES))
    except CheckpointNotFoundError:
        return None
    except CorruptCheckpointError:
        holder = None
    pid = holder.get("pid") if holder else None
    running = (
        _pid_running(pid)
        if holder is not None and holder.get("machine") == MACHINE and isinstance(pid, int)
        else None
    )
    lease = not storage.supports_flock
    expires = holder.get("expires") if holder else None
    expired = (expires < now) if lease and isinstance(expires, (int, float)) else None
    if not lease:
        if running:
            plan = "held by a running process: the next open fails until that process ends"
        elif running is False:
            plan = "its holder has ended (the kernel dropped its lock): the next open takes it"
        else:
            plan = (
                "the next open takes it at once if no process holds its flock (a process "
                "on another machine sharing this disk may)"
            )
    elif running is False:
        plan = "its holder has ended: the next open takes the lease over at once"
    elif expired:
        plan = (
            "the lease has expired (not renewed): the next open watches it for one lease "
            "term (lease_seconds) and takes it over if it stays unchanged"
        )
    else:
        plan = (
            "the lease is current: the next open fails if its holder renews it within one "
            "lease term (lease_seconds), else takes it over"
        )
    return LockInfo(storage.url(path), holder, lease, running, expired, plan)

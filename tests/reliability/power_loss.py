"""A power-loss simulator for local disk, in the manner of ALICE and CrashMonkey.

:class:`RecordingOs` stands in for the ``os`` module of every anyckpt module that does file
I/O through it (found by name, so it survives modules being split or moved) and of fsspec's
local filesystem (``makedirs``). Under a root directory it records, in the order they took
effect, the operations that change what a power cut can leave: ``create`` (an ``open`` with
``O_CREAT`` that made a file), ``write`` (``write``/``writev``/``pwrite``, with offset and
bytes), ``truncate`` (``ftruncate``, ``O_TRUNC``), ``fsync``/``fdatasync`` of a file, of a
directory (``dirsync``), ``rename``/``replace``, ``link``, ``unlink``, ``mkdir``, ``rmdir``.
Every call is forwarded to the real ``os``. ``fallocate(KEEP_SIZE)`` and
``sync_file_range``, which anyckpt calls through libc, change no content and guarantee
nothing; they are not recorded. The same proxy can make an operation fail *after* it took
effect (:attr:`RecordingOs.after`), for the fault suites.

:class:`Model` replays a recording and, at any crash point (after the n-th operation),
enumerates the states a power cut could leave on disk. The rules (the persistence model):

* A file's content has a durable part (as of its last ``fsync``/``fdatasync``) and the
  writes and truncations since, which are volatile.
* A directory's entries have a durable part (as of its last ``fsync``) and the entry
  operations since (a file created, renamed into or out of it, linked, unlinked; a
  sub-directory made), which are volatile. ``fsync`` of a file persists its content only,
  never its name (POSIX; ext4 happens to do more).
* ``weak`` (the weakest POSIX model, the one checked): at a power cut, any subset of a
  directory's volatile entry operations may have reached the disk, in any combination, and
  each file's volatile writes may be lost entirely, kept in full, kept up to any prefix
  (in order), or torn: a prefix, then the next write only partly, 4 KiB block by block,
  unwritten blocks reading as zeros (the file size as written).
* ``ordered`` (ext4 ``data=ordered``-like, for comparison): entry operations reach the disk as
  a prefix of the order they were made in (one journal), and an ``fsync`` of anything commits
  every entry operation before it; file contents are lost, kept, or kept up to a prefix,
  never torn.
* A rename that reaches the disk moves the inode it moved when it was made, whether or not
  the creation of its source name did (the inode exists: it was written).

Each crash state is materialised into a fresh directory: regular files with the chosen
contents, hard links where two names share an inode.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

BLOCK = 4096


@dataclass(frozen=True)
class Op:
    """One recorded operation. Paths are relative to the recording's root ("" is the root)."""

    kind: str  # create write truncate fsync dirsync rename link unlink mkdir rmdir mark
    path: str = ""
    ino: int = 0
    offset: int = 0
    data: bytes = b""
    dst: str = ""
    label: str = ""  # marks: what the test noted at this point (e.g. "confirmed 3")

    def __repr__(self) -> str:
        extra = f" {self.offset}+{len(self.data)}" if self.kind == "write" else ""
        extra += f" -> {self.dst}" if self.dst else ""
        extra += f" {self.label}" if self.label else ""
        return f"<{self.kind} {self.path} #{self.ino}{extra}>"


class RecordingOs:
    """``os`` for the modules it replaces: records the operations under ``root`` (see the
    module docstring), forwards everything. ``after(op)``, if set, is called once an
    operation took effect and may raise (a fault after the effect)."""

    def __init__(self, real: Any, root: str) -> None:
        self._real = real
        self._root = os.path.realpath(root).rstrip("/")
        self._lock = threading.RLock()
        self._fds: dict[int, tuple[str, int, bool]] = {}  # fd -> (path, ino, is_dir)
        self._names: dict[str, int] = {}  # live namespace: relative path -> inode
        self._next = 1
        self.ops: list[Op] = []
        self.recording = True
        self.after: Callable[[Op], None] | None = None

    # -- plumbing --
    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _rel(self, path: Any) -> str | None:
        if isinstance(path, int):
            return None
        text = os.path.abspath(os.fspath(path))
        if isinstance(text, bytes):
            text = text.decode()
        if text == self._root:
            return ""
        if text.startswith(self._root + "/"):
            return text[len(self._root) + 1 :]
        return None

    def _add(self, op: Op) -> None:
        if self.recording:
            self.ops.append(op)
            if self.after is not None:
                self.after(op)

    def _new_ino(self, rel: str) -> int:
        ino = self._next
        self._next += 1
        self._names[rel] = ino
        return ino

    def mark(self, label: str) -> None:
        """Note a point in the recording (e.g. a save confirmed durable)."""
        with self._lock:
            self.ops.append(Op("mark", label=label))

    # -- opening and closing --
    def open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        rel = self._rel(path)
        if rel is None or dir_fd is not None:
            return int(self._real.open(path, flags, mode, dir_fd=dir_fd))
        with self._lock:
            existed = self._real.path.lexists(path)
            fd = int(self._real.open(path, flags, mode))
            is_dir = stat.S_ISDIR(self._real.fstat(fd).st_mode)
            if is_dir:
                self._fds[fd] = (rel, 0, True)
                return fd
            if not existed and flags & os.O_CREAT:
                ino = self._new_ino(rel)
                self._fds[fd] = (rel, ino, False)
                self._add(Op("create", rel, ino))
            else:
                ino = self._names.get(rel) or self._new_ino(rel)
                self._fds[fd] = (rel, ino, False)
                if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                    self._add(Op("truncate", rel, ino, offset=0))
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._real.close(fd)

    # -- content --
    def _file(self, fd: int) -> tuple[str, int] | None:
        entry = self._fds.get(fd)
        return None if entry is None or entry[2] else (entry[0], entry[1])

    def write(self, fd: int, data: Any) -> int:
        with self._lock:
            known = self._file(fd)
            if known is None:
                return int(self._real.write(fd, data))
            offset = self._real.lseek(fd, 0, os.SEEK_CUR)
            n = int(self._real.write(fd, data))
            self._add(
                Op("write", known[0], known[1], offset, bytes(memoryview(data).cast("B")[:n]))
            )
            return n

    def writev(self, fd: int, buffers: Any) -> int:
        with self._lock:
            known = self._file(fd)
            buffers = list(buffers)
            if known is None:
                return int(self._real.writev(fd, buffers))
            offset = self._real.lseek(fd, 0, os.SEEK_CUR)
            n = int(self._real.writev(fd, buffers))
            data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:n]
            self._add(Op("write", known[0], known[1], offset, data))
            return n

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        with self._lock:
            known = self._file(fd)
            n = int(self._real.pwrite(fd, data, offset))
            if known is not None:
                payload = bytes(memoryview(data).cast("B")[:n])
                self._add(Op("write", known[0], known[1], offset, payload))
            return n

    def ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            self._real.ftruncate(fd, length)
            known = self._file(fd)
            if known is not None:
                self._add(Op("truncate", known[0], known[1], offset=length))

    def fsync(self, fd: int) -> None:
        with self._lock:
            self._real.fsync(fd)
            entry = self._fds.get(fd)
            if entry is not None:
                path, ino, is_dir = entry
                self._add(Op("dirsync", path) if is_dir else Op("fsync", path, ino))

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            self._real.fdatasync(fd)
            entry = self._fds.get(fd)
            if entry is not None and not entry[2]:
                self._add(Op("fsync", entry[0], entry[1]))

    # -- names --
    def replace(self, src: Any, dst: Any) -> None:
        self._rename(self._real.replace, src, dst)

    def rename(self, src: Any, dst: Any) -> None:
        self._rename(self._real.rename, src, dst)

    def _rename(self, call: Callable[[Any, Any], None], src: Any, dst: Any) -> None:
        a, b = self._rel(src), self._rel(dst)
        with self._lock:
            call(src, dst)
            if a is None or b is None:
                return
            ino = self._names.pop(a, 0) or self._new_ino(b)
            self._names[b] = ino
            self._add(Op("rename", a, ino, dst=b))

    def link(self, src: Any, dst: Any, **kwargs: Any) -> None:
        a, b = self._rel(src), self._rel(dst)
        with self._lock:
            self._real.link(src, dst, **kwargs)
            if a is None or b is None:
                return
            ino = self._names.get(a) or self._new_ino(a)
            self._names[b] = ino
            self._add(Op("link", a, ino, dst=b))

    def unlink(self, path: Any, **kwargs: Any) -> None:
        rel = self._rel(path)
        with self._lock:
            self._real.unlink(path, **kwargs)
            if rel is not None:
                self._add(Op("unlink", rel, self._names.pop(rel, 0)))

    remove = unlink

    def mkdir(self, path: Any, mode: int = 0o777, **kwargs: Any) -> None:
        rel = self._rel(path)
        with self._lock:
            self._real.mkdir(path, mode, **kwargs)
            if rel is not None:
                self._add(Op("mkdir", rel))

    def makedirs(self, name: Any, mode: int = 0o777, exist_ok: bool = False) -> None:
        path = os.path.abspath(os.fspath(name))
        missing: list[str] = []
        while not self._real.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        if not missing and not exist_ok:
            raise FileExistsError(errno.EEXIST, "File exists", os.fspath(name))
        for path in reversed(missing):
            with suppress(FileExistsError):  # made meanwhile
                self.mkdir(path, mode)

    def rmdir(self, path: Any, **kwargs: Any) -> None:
        rel = self._rel(path)
        with self._lock:
            self._real.rmdir(path, **kwargs)
            if rel is not None:
                self._add(Op("rmdir", rel))


def modules_doing_file_io() -> list[Any]:
    """Every loaded module whose ``os`` is to be replaced: anyckpt's (storage, lease and
    whichever others hold ``os``: found by name, so a module split into a package is covered)
    and fsspec's local filesystem (``makedirs``)."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or getattr(module, "os", None) is not os:
            continue
        if (
            name == "anyckpt"
            or name.startswith("anyckpt.")
            or name == "fsspec.implementations.local"
        ):
            found.append(module)
    return found


class Recording:
    """Install a :class:`RecordingOs` on every module doing file I/O (context manager)."""

    def __init__(self, root: str | Path) -> None:
        self.proxy = RecordingOs(os, str(root))
        self._patched: list[Any] = []

    def __enter__(self) -> RecordingOs:
        for module in modules_doing_file_io():
            module.os = self.proxy
            self._patched.append(module)
        names = {m.__name__ for m in self._patched}
        # The modules whose writes matter must be among them, however storage is laid out.
        assert any(n.startswith("anyckpt.storage") for n in names), sorted(names)
        return self.proxy

    def __exit__(self, *exc: object) -> None:
        for module in self._patched:
            module.os = os
        self._patched.clear()


# -- the model ---------------------------------------------------------------------------------


@dataclass
class _File:
    durable: bytes = b""
    pending: list[Op] = field(default_factory=list)  # writes and truncations since the fsync

    def apply(self, base: bytes, ops: list[Op]) -> bytes:
        data = bytearray(base)
        for op in ops:
            data = _apply_write(data, op)
        return bytes(data)

    @property
    def volatile(self) -> bytes:
        return self.apply(self.durable, self.pending)


def _apply_write(data: bytearray, op: Op) -> bytearray:
    if op.kind == "truncate":
        del data[op.offset :]
        data.extend(b"\0" * (op.offset - len(data)))
        return data
    end = op.offset + len(op.data)
    if len(data) < end:
        data.extend(b"\0" * (end - len(data)))
    data[op.offset : end] = op.data
    return data


def _chosen(choice: dict[int, bytes], ino: int, f: _File) -> bytes:
    return choice.get(ino, f.volatile)


def _torn(data: bytes, op: Op, rng: random.Random) -> bytes:
    """``op`` (a write) applied only in part: each 4 KiB block of it reached the disk or not
    (the size as written; blocks that did not read as zeros, or as what was there)."""
    out = bytearray(data)
    end = op.offset + len(op.data)
    if len(out) < end:
        out.extend(b"\0" * (end - len(out)))
    first = op.offset // BLOCK
    for block in range(first, (end + BLOCK - 1) // BLOCK):
        lo, hi = max(block * BLOCK, op.offset), min((block + 1) * BLOCK, end)
        if rng.random() < 0.5:
            out[lo:hi] = op.data[lo - op.offset : hi - op.offset]
    return bytes(out)


#: A directory entry: ("f", inode) or ("d", relative path of the directory).
Entry = tuple[str, Any]


@dataclass
class _Dir:
    durable: dict[str, Entry] = field(default_factory=dict)
    pending: list[tuple[int, str, str, Entry | None]] = field(default_factory=list)
    # (sequence number, "set"|"del", name, entry)


@dataclass(frozen=True)
class CrashState:
    """What one power cut leaves: relative path -> content (None: a directory), hard links
    as groups of paths sharing an inode. ``how`` says how it was chosen."""

    files: tuple[tuple[str, bytes | None], ...]
    links: tuple[tuple[str, ...], ...]
    how: str

    def key(self) -> str:
        digest = hashlib.sha256()
        for path, data in self.files:
            digest.update(path.encode() + b"\0")
            digest.update(b"D" if data is None else hashlib.sha256(data).digest())
        for group in self.links:
            digest.update(repr(group).encode())
        return digest.hexdigest()

    def materialise(self, into: Path) -> None:
        into.mkdir(parents=True)
        linked = {path: group[0] for group in self.links for path in group[1:]}
        for path, data in self.files:  # parents come before their children (sorted)
            if data is None:
                (into / path).mkdir()
            elif path not in linked:
                (into / path).write_bytes(data)
        for path, first in linked.items():
            os.link(into / first, into / path)


class Model:
    """The file system a recording describes, replayed operation by operation."""

    def __init__(self, durable: list[str] | tuple[str, ...] = ()) -> None:
        """``durable``: sub-directories (relative paths) that exist, durably, before the
        recording starts (made outside it)."""
        self.files: dict[int, _File] = {}
        self.dirs: dict[str, _Dir] = {"": _Dir()}
        for rel in durable:
            self.dirs[rel] = _Dir()
            parent, _, name = rel.rpartition("/")
            self.dirs.setdefault(parent, _Dir()).durable[name] = ("d", rel)
        self.seq = 0
        self.confirmed: list[str] = []  # marks seen so far

    def _dir_of(self, rel: str) -> tuple[_Dir, str]:
        parent, _, name = rel.rpartition("/")
        return self.dirs.setdefault(parent, _Dir()), name

    def _entry_op(self, rel: str, kind: str, entry: Entry | None) -> None:
        self.seq += 1
        directory, name = self._dir_of(rel)
        directory.pending.append((self.seq, kind, name, entry))

    def apply(self, op: Op, model: str) -> None:
        if op.kind == "mark":
            self.confirmed.append(op.label)
        elif op.kind == "create":
            self.files[op.ino] = _File()
            self._entry_op(op.path, "set", ("f", op.ino))
        elif op.kind in ("write", "truncate"):
            self.files.setdefault(op.ino, _File()).pending.append(op)
        elif op.kind == "fsync":
            f = self.files.setdefault(op.ino, _File())
            f.durable, f.pending = f.volatile, []
            if model == "ordered":
                self._sync_all_entries()
        elif op.kind == "dirsync":
            directory = self.dirs.setdefault(op.path, _Dir())
            directory.durable = self._entries(directory, len(directory.pending))
            directory.pending = []
            if model == "ordered":
                self._sync_all_entries()
        elif op.kind == "rename":
            self._entry_op(op.path, "del", None)
            self._entry_op(op.dst, "set", ("f", op.ino))
        elif op.kind == "link":
            self._entry_op(op.dst, "set", ("f", op.ino))
        elif op.kind == "unlink":
            self._entry_op(op.path, "del", None)
        elif op.kind == "mkdir":
            self.dirs[op.path] = _Dir()
            self._entry_op(op.path, "set", ("d", op.path))
        elif op.kind == "rmdir":
            self._entry_op(op.path, "del", None)
        else:  # pragma: no cover
            raise AssertionError(op)

    def _sync_all_entries(self) -> None:
        for directory in self.dirs.values():
            directory.durable = self._entries(directory, len(directory.pending))
            directory.pending = []

    @staticmethod
    def _entries(directory: _Dir, upto: int, chosen: set[int] | None = None) -> dict[str, Entry]:
        out = dict(directory.durable)
        for seq, kind, name, entry in directory.pending[:upto]:
            if chosen is not None and seq not in chosen:
                continue
            if kind == "set":
                assert entry is not None
                out[name] = entry
            else:
                out.pop(name, None)
        return out

    # -- crash states --
    def _pending_seqs(self) -> list[int]:
        return sorted(seq for d in self.dirs.values() for seq, *_ in d.pending)

    def state(
        self, entries: set[int], contents: Callable[[int, _File], bytes], how: str
    ) -> CrashState:
        """The state where the entry operations ``entries`` (sequence numbers) reached the
        disk, and file ``ino`` holds ``contents(ino, file)``."""
        files: list[tuple[str, bytes | None]] = []
        by_ino: dict[int, list[str]] = {}

        def walk(rel: str) -> None:
            directory = self.dirs.get(rel, _Dir())
            for name, (kind, target) in sorted(
                self._entries(directory, len(directory.pending), entries).items()
            ):
                path = f"{rel}/{name}" if rel else name
                if kind == "d":
                    files.append((path, None))
                    walk(target)
                else:
                    if target not in by_ino:
                        f = self.files.get(target, _File())
                        files.append((path, contents(target, f)))
                    by_ino.setdefault(target, []).append(path)

        walk("")
        data = dict(files)
        files.extend((path, data[g[0]]) for g in by_ino.values() for path in g[1:])
        files.sort()
        links = tuple(tuple(g) for g in by_ino.values() if len(g) > 1)
        return CrashState(tuple(files), links, how)

    def crash_states(self, model: str, cap: int, rng: random.Random) -> Iterator[CrashState]:
        """Up to ``cap`` distinct states a power cut now could leave: first the two
        extremes (nothing volatile persisted; everything), then, for ``ordered``, each prefix
        of the entry operations, for ``weak``, random subsets and per-file choices
        (seeded), each with the contents lost, kept, at a prefix or (weak) torn."""
        seqs = self._pending_seqs()
        dirty = [ino for ino, f in self.files.items() if f.pending]
        seen: set[str] = set()

        def durable(ino: int, f: _File) -> bytes:
            return f.durable

        def volatile(ino: int, f: _File) -> bytes:
            return f.volatile

        candidates: list[tuple[set[int], Callable[[int, _File], bytes], str]] = [
            (set(), durable, "nothing volatile persisted"),
            (set(seqs), volatile, "everything persisted"),
        ]
        if model == "ordered":
            for k in range(1, len(seqs)):
                candidates.append((set(seqs[:k]), volatile, f"first {k} entry ops, contents"))
                candidates.append((set(seqs[:k]), durable, f"first {k} entry ops, no contents"))
        count = 0
        for entries, contents, how in candidates:
            state = self.state(entries, contents, how)
            if state.key() not in seen:
                seen.add(state.key())
                count += 1
                yield state
                if count >= cap:
                    return
        if not seqs and not dirty:
            return
        tries = 0
        while count < cap and tries < cap * 8:
            tries += 1
            if model == "ordered":
                entries = set(seqs[: rng.randint(0, len(seqs))])
            else:
                entries = {s for s in seqs if rng.random() < 0.5}
            choice: dict[int, bytes] = {}
            for ino in dirty:
                f = self.files[ino]
                roll = rng.random()
                if roll < 0.25:
                    choice[ino] = f.durable
                elif roll < 0.5:
                    choice[ino] = f.volatile
                else:
                    k = rng.randint(0, len(f.pending) - 1)
                    base = f.apply(f.durable, f.pending[:k])
                    nxt = f.pending[k]
                    if model == "weak" and nxt.kind == "write" and roll >= 0.75:
                        choice[ino] = _torn(base, nxt, rng)
                    else:
                        choice[ino] = base
            how = f"random: {len(entries)} of {len(seqs)} entry ops, {len(dirty)} files mixed"
            state = self.state(entries, partial(_chosen, choice), how)
            if state.key() not in seen:
                seen.add(state.key())
                count += 1
                yield state

"""The manager's commit protocol (issue 3), step by step, with each step failing in turn.

1. every data shard, then the index; 2. only then the state file; 3. only then retention's
deletes (and the state file once more, as TensorFlow does). A failure at any step must reach the
caller, leave ``latest_checkpoint`` on a complete checkpoint equal to the last committed save,
and leave nothing that the next manager does not clean up.

Faults are injected below anyckpt: in a ``memory://`` filesystem whose files become visible on
close, like object-store uploads (``faultmem://``), and in the ``os`` calls of
:mod:`anyckpt.storage` for local disk (``os.replace`` makes a written file visible,
``os.unlink`` deletes one).
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.utils import stringify_path
from os_seam import patch_os

import anyckpt
import anyckpt.storage
from anyckpt import CheckpointManager, CheckpointState
from anyckpt.codecs.state_file import decode_state, encode_state
from anyckpt.lease import LOCK_FILE
from anyckpt.storage import TEMP_MARKER


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class InjectedFault(OSError):
    pass


@dataclass
class Plan:
    """Logs every commit (a file becoming visible) and remove under ``root``, and fails the
    ``occurrence``-th one matching ``fail`` (op, file name), once."""

    root: str = "/nowhere"
    log: list[tuple[str, str]] = field(default_factory=list)
    fail: tuple[str, str, int] | None = None
    seen: int = 0
    fired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, op: str, name: str, occurrence: int = 1) -> None:
        with self.lock:
            self.log.clear()
            self.fail, self.seen, self.fired = (op, name, occurrence), 0, False

    def disarm(self) -> None:
        with self.lock:
            self.log.clear()
            self.fail = None

    def check(self, op: str, path: Any) -> None:
        path = os.fspath(path)
        name = posixpath.basename(path)
        if TEMP_MARKER in name or name == LOCK_FILE or posixpath.dirname(path) != self.root:
            return
        with self.lock:
            self.log.append((op, name))
            if self.fail is not None and not self.fired and self.fail[:2] == (op, name):
                self.seen += 1
                if self.seen == self.fail[2]:
                    self.fired = True
                    raise InjectedFault(f"injected: {op} {name} (#{self.seen})")


PLAN = Plan()


class _FaultWriteFile(io.BytesIO):
    def __init__(self, fs: FaultMemoryFS, path: str) -> None:
        super().__init__()
        self.fs, self.path, self._finished = fs, path, False

    def close(self) -> None:
        if not self._finished:
            PLAN.check("commit", self.path)  # fails like an upload: nothing becomes visible
            self._finished = True
            MemoryFile(self.fs, self.path, self.getvalue()).commit()
        super().close()

    def discard(self) -> None:
        self._finished = True
        super().close()

    def __del__(self) -> None:
        pass


class FaultMemoryFS(MemoryFileSystem):
    """``faultmem://``: memory:// with a store of its own; writes become visible on close."""

    protocol = "faultmem"
    store: ClassVar[dict[str, Any]] = {}  # type: ignore[misc]
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return str(super()._strip_protocol(stringify_path(path).removeprefix("faultmem://")))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "x" in mode:
            return _FaultWriteFile(self, self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        """anyckpt commits a file on a non-object store by moving its temporary over it."""
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        PLAN.check("commit", path2)
        self.store[path2] = self.store.pop(path1)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        if path in self.store:  # removing what is not there is no step
            PLAN.check("remove", path)
        super().rm_file(path)


fsspec.register_implementation("faultmem", FaultMemoryFS, clobber=True)


class _FaultyOs:
    """The ``os`` module as anyckpt's local file I/O sees it (tests/os_seam.py), with faults
    in replace/rename/unlink."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        PLAN.check("commit", dst)
        self._real.replace(src, dst, *args, **kwargs)

    def rename(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        PLAN.check("commit", dst)
        self._real.rename(src, dst, *args, **kwargs)

    def unlink(self, path: Any, *args: Any, **kwargs: Any) -> None:
        if self._real.path.lexists(path):  # removing what is not there is no step
            PLAN.check("remove", path)
        self._real.unlink(path, *args, **kwargs)

    remove = unlink


@dataclass
class Dir:
    """A checkpoint directory and a look at it behind anyckpt's back."""

    url: str
    options: dict[str, Any] | None
    fs: Any
    root: str

    def names(self) -> set[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        # Without the lock file of an open manager (tests/reliability covers it).
        return {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {LOCK_FILE}

    def read(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(f"{self.root}/{name}"))

    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{name}", data)

    def manager(self, **kwargs: Any) -> CheckpointManager:
        return CheckpointManager(self.url, storage_options=self.options, **kwargs)


@pytest.fixture(params=["memory", "local"])
def faulty(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Dir]:
    """A directory whose writes and deletes go through PLAN (disarmed at first)."""
    if request.param == "memory":
        root = f"/run-{uuid.uuid4().hex[:12]}"
        PLAN.root = root
        PLAN.disarm()
        fs = fsspec.filesystem("faultmem")
        yield Dir(f"faultmem://{root.lstrip('/')}", None, fs, root)
        for key in [k for k in FaultMemoryFS.store if k.startswith(root + "/")]:
            del FaultMemoryFS.store[key]
    else:
        directory = tmp_path / "ckpts"
        PLAN.root = str(directory)
        PLAN.disarm()
        patch_os(monkeypatch, _FaultyOs(os))
        yield Dir(str(directory), None, fsspec.filesystem("file"), str(directory))
    PLAN.disarm()
    PLAN.root = "/nowhere"


@pytest.fixture(params=["memory", "local", "s3", "gcs"])
def anywhere(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dir]:
    kind = request.param
    if kind == "memory":
        root = f"/anyckpt-commit-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem("memory")
        yield Dir(f"memory://{root.lstrip('/')}", None, fs, root)
        for key in [k for k in fs.store if k.startswith(root + "/")]:
            del fs.store[key]
    elif kind == "local":
        directory = tmp_path / "ckpts"
        directory.mkdir()
        yield Dir(str(directory), None, fsspec.filesystem("file"), str(directory))
    else:
        bucket = request.getfixturevalue(f"{kind}_bucket")
        yield Dir(
            f"{bucket.url}/run", bucket.storage_options, bucket.filesystem(), f"{bucket.name}/run"
        )


# -- the saves ------------------------------------------------------------------------------


def values(step: int) -> dict[str, np.ndarray]:
    return {"a": np.full(4, step, dtype=np.int64), "b": np.arange(3, dtype=np.float32) * step}


def shard_of(key: str) -> int:
    return 0 if key == "a" else 1


OPTIONS: dict[str, Any] = {"max_to_keep": 2, "format_options": {"shard_of": shard_of}}


def files(step: int) -> set[str]:
    return {f"ckpt-{step}.index"} | {f"ckpt-{step}.data-{i:05d}-of-00002" for i in range(2)}


def assert_values(restored: dict[str, np.ndarray], step: int) -> None:
    want = values(step)
    assert sorted(restored) == sorted(want)
    for key, array in want.items():
        assert restored[key].dtype == array.dtype
        assert restored[key].tolist() == array.tolist()


def assert_no_debris(names: set[str]) -> None:
    """No temporary files; every data file has its index."""
    assert not [n for n in names if TEMP_MARKER in n]
    for name in names:
        if ".data-" in name:
            assert f"{name.split('.data-')[0]}.index" in names, f"orphan data file {name}"


def find_fault(exc: BaseException) -> InjectedFault | None:
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InjectedFault):
            return e
        todo.extend(getattr(e, "exceptions", ()))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


# -- the order of the steps -----------------------------------------------------------------


@pytest.mark.anyio
async def test_protocol_order(faulty: Dir) -> None:
    """Data shards, then the index, then the state file; then retention's deletes (the index,
    the commit marker, first), then the state file again."""
    async with faulty.manager(**OPTIONS) as manager:
        for step in (1, 2):
            await manager.save(values(step), step=step)
        await manager.wait()
        PLAN.disarm()  # clears the log
        await (await manager.save(values(3), step=3))
    log = list(PLAN.log)
    assert sorted(log[:2]) == [("commit", n) for n in sorted(files(3) - {"ckpt-3.index"})]
    assert log[2:4] == [("commit", "ckpt-3.index"), ("commit", "checkpoint")]
    assert log[4] == ("remove", "ckpt-1.index")
    assert sorted(log[5:7]) == [("remove", n) for n in sorted(files(1) - {"ckpt-1.index"})]
    assert log[7:] == [("commit", "checkpoint")]


# -- each step fails in turn ----------------------------------------------------------------

# (op, file, occurrence within save 3, committed?)
CRASH_POINTS = [
    ("commit", "ckpt-3.data-00000-of-00002", 1, False),
    ("commit", "ckpt-3.data-00001-of-00002", 1, False),
    ("commit", "ckpt-3.index", 1, False),
    ("commit", "checkpoint", 1, False),
    ("remove", "ckpt-1.index", 1, True),
    ("remove", "ckpt-1.data-00000-of-00002", 1, True),
    ("remove", "ckpt-1.data-00001-of-00002", 1, True),
    ("commit", "checkpoint", 2, True),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("op", "name", "occurrence", "committed"),
    CRASH_POINTS,
    ids=[f"{op}-{name}-{n}" for op, name, n, _ in CRASH_POINTS],
)
async def test_failure_at_each_step(
    faulty: Dir,
    op: str,
    name: str,
    occurrence: int,
    committed: bool,
    request: pytest.FixtureRequest,
) -> None:
    async with faulty.manager(**OPTIONS) as manager:
        for step in (1, 2):
            await manager.save(values(step), step=step)
        await manager.wait()
        PLAN.arm(op, name, occurrence)
        pending = await manager.save(values(3), step=3)
        with pytest.raises(BaseException) as info:  # noqa: PT011
            await pending
        assert find_fault(info.value) is not None, info.value  # the error reaches the caller
        assert PLAN.fired
        latest = 3 if committed else 2
        assert manager.latest_step == latest
    PLAN.disarm()

    # What a reader (TensorFlow's latest_checkpoint) sees: complete, the last committed save.
    prefix = await anyckpt.latest_checkpoint(faulty.url)
    assert prefix == f"{faulty.url}/ckpt-{latest}"
    assert_values(await anyckpt.load(prefix), latest)
    if not committed:  # the failing manager removed what it wrote
        assert not files(3) & faulty.names()

    async with faulty.manager(**OPTIONS) as manager:
        # a new manager: the same latest, and the debris is gone before it saves anything
        assert manager.latest_checkpoint == prefix
        assert_values(await manager.restore(), latest)
        assert_no_debris(faulty.names())
        pending = await (await manager.save(values(latest + 1)))
        assert pending.step == latest + 1
    # retention caught up: exactly the two newest committed checkpoints remain
    assert faulty.names() == {"checkpoint"} | files(latest) | files(latest + 1)
    state = decode_state(faulty.read("checkpoint"))
    assert state.all_model_checkpoint_paths == (f"ckpt-{latest}", f"ckpt-{latest + 1}")
    assert_values(await anyckpt.load(f"{faulty.url}/ckpt-{latest + 1}"), latest + 1)


# -- leftovers of a crash -------------------------------------------------------------------


async def _committed_1_2(d: Dir) -> None:
    async with d.manager(**OPTIONS) as manager:
        for step in (1, 2):
            await manager.save(values(step), step=step)


@pytest.mark.anyio
async def test_index_written_state_file_not(anywhere: Dir) -> None:
    """A crash between the index and the state file: a complete bundle under the next step's
    name, never recorded. It is not the latest, and the next manager removes it."""
    await _committed_1_2(anywhere)
    state_before = anywhere.read("checkpoint")
    await anyckpt.save(
        f"{anywhere.url}/ckpt-3",
        {"a": np.zeros(4, dtype=np.int64), "stale": np.ones(2)},
        storage_options=anywhere.options,
    )
    assert await anyckpt.latest_checkpoint(anywhere.url, storage_options=anywhere.options) == (
        f"{anywhere.url}/ckpt-2"
    )
    async with anywhere.manager(**OPTIONS) as manager:
        assert manager.latest_checkpoint == f"{anywhere.url}/ckpt-2"
        assert manager.checkpoints == [f"{anywhere.url}/ckpt-1", f"{anywhere.url}/ckpt-2"]
        assert anywhere.names() == {"checkpoint"} | files(1) | files(2)
        assert anywhere.read("checkpoint") == state_before
        pending = await (await manager.save(values(3)))  # the step number is free again
        assert pending.step == 3
        assert_values(await manager.restore(), 3)
    assert anywhere.names() == {"checkpoint"} | files(2) | files(3)


@pytest.mark.anyio
async def test_debris_is_cleaned_and_nothing_else(anywhere: Dir) -> None:
    for step in (1, 2, 3):
        await anyckpt.save(
            f"{anywhere.url}/ckpt-{step}",
            values(step),
            storage_options=anywhere.options,
            options={"shard_of": shard_of},
        )
    # ckpt-1 is complete and untracked (as a preserved checkpoint is): it stays
    state = CheckpointState("ckpt-3", ("ckpt-2", "ckpt-3"), (100.0, 200.0), 50.0)
    anywhere.put("checkpoint", encode_state(state))
    await anyckpt.save(
        f"{anywhere.url}/ckpt-4", {"x": np.ones(1)}, storage_options=anywhere.options
    )
    debris = {
        "ckpt-4.index",  # complete but newer than the latest commit: never recorded
        "ckpt-4.data-00000-of-00001",
        "ckpt-5.data-00000-of-00002",  # data without index
        "ckpt-0.data-00000-of-00001",
        f"ckpt-5.index{TEMP_MARKER}0a1b2c3d",  # temporary files of this naming
        f"ckpt-6.data-00000-of-00001{TEMP_MARKER}deadbeef",
        f"checkpoint{TEMP_MARKER}00ff00ff",
    }
    foreign = {
        "notes.txt",
        f"notes.txt{TEMP_MARKER}12345678",  # not this manager's naming
        "model-7.data-00000-of-00001",  # another checkpoint name
        "ckpt-x.index",
        "ckpt-8.index.bak",
        "ckpt-8.data-00000-of-00001.partial",
    }
    for name in (debris | foreign) - {"ckpt-4.index", "ckpt-4.data-00000-of-00001"}:
        anywhere.put(name, b"junk")
    kept = {"checkpoint"} | files(1) | files(2) | files(3) | foreign
    assert anywhere.names() == kept | debris

    async with anywhere.manager(**OPTIONS, clock=lambda: 300.0) as manager:
        assert anywhere.names() == kept
        assert manager.latest_step == 3
        await (await manager.save(values(4)))
    assert anywhere.names() == (kept - files(2)) | files(4)
    assert_values(await anyckpt.load(f"{anywhere.url}/ckpt-4", storage_options=anywhere.options), 4)


@pytest.mark.anyio
async def test_without_a_state_file_only_incomplete_files_go(anywhere: Dir) -> None:
    """Without a state file nothing tells a finished save from an interrupted one, so a
    complete bundle stays; files that can never be complete go."""
    await anyckpt.save(f"{anywhere.url}/ckpt-7", values(7), storage_options=anywhere.options)
    anywhere.put("ckpt-8.data-00000-of-00001", b"junk")
    anywhere.put(f"ckpt-8.index{TEMP_MARKER}01234567", b"junk")
    anywhere.put(f"checkpoint{TEMP_MARKER}89abcdef", b"junk")
    anywhere.put("readme.md", b"hello")
    async with anywhere.manager(**OPTIONS) as manager:
        assert manager.latest_checkpoint is None
        assert anywhere.names() == {"ckpt-7.index", "ckpt-7.data-00000-of-00001", "readme.md"}
        assert (await (await manager.save(values(1)))).step == 1
    assert anywhere.names() == {
        "checkpoint",
        "ckpt-7.index",
        "ckpt-7.data-00000-of-00001",
        "readme.md",
    } | files(1)

"""The blocking facade, :class:`anyckpt.sync.CheckpointManager`, and the sync twins of
``latest_checkpoint`` / ``get_checkpoint_state``: the same machinery on a background event loop.

A slow storage is a ``memory://`` filesystem whose writers wait at a gate (a threading.Event)
before writing any byte, so "save() returns before the write completes" is checked as a
property (the save is not done while the gate is closed), not as a timing.
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.utils import stringify_path

import anyckpt
import anyckpt.sync
from anyckpt.codecs.state_file import decode_state
from anyckpt.lease import LOCK_FILE


class InjectedFault(OSError):
    pass


@dataclass
class _Hook:
    fn: Callable[[str, str], None] | None = None


HOOK = _Hook()


class _WriteFile(io.BytesIO):
    def __init__(self, fs: SyncGatedFS, path: str) -> None:
        super().__init__()
        self.fs, self.path, self._finished = fs, path, False

    def close(self) -> None:
        if not self._finished:
            if HOOK.fn is not None and LOCK_FILE not in self.path:
                HOOK.fn("commit", self.path)
            self._finished = True
            MemoryFile(self.fs, self.path, self.getvalue()).commit()
        super().close()

    def discard(self) -> None:
        self._finished = True
        super().close()

    def __del__(self) -> None:
        pass


class SyncGatedFS(MemoryFileSystem):
    """``syncgated://``: memory:// with a store of its own and ``HOOK.fn(op, path)`` called when
    a file is opened for writing ("open") and before it becomes visible ("commit")."""

    protocol = "syncgated"
    store: ClassVar[dict[str, Any]] = {}  # type: ignore[misc]
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return str(super()._strip_protocol(stringify_path(path).removeprefix("syncgated://")))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "x" in mode:
            path = self._strip_protocol(path)
            if HOOK.fn is not None and LOCK_FILE not in path:
                HOOK.fn("open", path)
            return _WriteFile(self, path)
        return super()._open(path, mode, **kwargs)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        """anyckpt commits a file on a non-object store by moving its temporary over it."""
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if HOOK.fn is not None and LOCK_FILE not in path2:
            HOOK.fn("commit", path2)
        self.store[path2] = self.store.pop(path1)


fsspec.register_implementation("syncgated", SyncGatedFS, clobber=True)


class Gate:
    def __init__(self) -> None:
        self.opened = threading.Event()

    def __call__(self, op: str, path: str) -> None:
        if op == "open" and not self.opened.wait(timeout=30):
            raise TimeoutError("test gate never opened")

    def open(self) -> None:
        self.opened.set()


def fail_commit_of(suffix: str) -> Callable[[str, str], None]:
    def hook(op: str, path: str) -> None:
        if op == "commit" and path.endswith(suffix):
            raise InjectedFault(f"injected: {path}")

    return hook


@pytest.fixture
def gated() -> Iterator[str]:
    HOOK.fn = None
    root = f"/run-{uuid.uuid4().hex[:12]}"
    yield f"syncgated://{root.lstrip('/')}"
    HOOK.fn = None
    for key in [k for k in SyncGatedFS.store if k.startswith(root + "/")]:
        del SyncGatedFS.store[key]


def names_in(url: str) -> set[str]:
    root = "/" + url.removeprefix("syncgated://")
    names = {k[len(root) + 1 :] for k in SyncGatedFS.store if k.startswith(root + "/")}
    return names - {LOCK_FILE}  # the lock file of an open manager


@pytest.fixture(params=["memory", "local"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "ckpts")
        return
    root = f"/anyckpt-sync-{uuid.uuid4().hex[:12]}"
    yield f"memory://{root.lstrip('/')}"
    store = fsspec.filesystem("memory").store
    for key in [k for k in store if k.startswith(root + "/")]:
        del store[key]


def state(step: int) -> dict[str, Any]:
    return {"net": {"w": np.arange(6.0).reshape(2, 3) * step, "b": np.full(3, step)}, "n": step}


def check(restored: dict[str, np.ndarray], step: int) -> None:
    assert sorted(restored) == ["n", "net/b", "net/w"]
    assert restored["net/w"].tolist() == (np.arange(6.0).reshape(2, 3) * step).tolist()
    assert restored["net/b"].tolist() == [step] * 3
    assert restored["n"].item() == step


def test_sync_save_wait_restore(directory: str) -> None:
    with anyckpt.sync.CheckpointManager(directory, max_to_keep=2) as manager:
        assert manager.latest_checkpoint is None
        pending = manager.save(state(1), step=1)
        assert isinstance(pending, anyckpt.sync.PendingSave)
        assert pending.step == 1
        assert pending.prefix == f"{directory}/ckpt-1"
        assert pending.wait() is pending
        assert pending.done()
        assert isinstance(pending.event, anyckpt.SaveEvent)
        check(manager.restore(), 1)
        for step in (2, 3):
            manager.save(state(step))
        manager.wait()
        assert manager.latest_step == 3
        assert manager.latest_checkpoint == f"{directory}/ckpt-3"
        assert manager.checkpoints == [f"{directory}/ckpt-2", f"{directory}/ckpt-3"]
        check(manager.restore(), 3)
        check(manager.restore(step=2), 2)
        assert list(manager.restore(keys=["n"])) == ["n"]
    assert anyckpt.sync.latest_checkpoint(directory) == f"{directory}/ckpt-3"
    got = anyckpt.sync.get_checkpoint_state(directory)
    assert got is not None
    assert got.all_model_checkpoint_paths == (f"{directory}/ckpt-2", f"{directory}/ckpt-3")
    check(anyckpt.sync.load(f"{directory}/ckpt-3"), 3)
    with anyckpt.sync.CheckpointManager(directory, max_to_keep=2) as manager:  # a restart
        assert manager.latest_step == 3
        assert manager.save(state(4)).wait().step == 4


def test_sync_save_returns_before_the_write_completes(gated: str) -> None:
    gate = Gate()
    HOOK.fn = gate
    w = np.arange(100.0)
    with anyckpt.sync.CheckpointManager(gated) as manager:
        pending = manager.save({"w": w}, step=1)
        # save() came back while the writer waits at the closed gate: nothing is written yet
        assert not pending.done()
        assert pending.event is None
        assert manager.latest_checkpoint is None
        assert names_in(gated) == set()
        w[:] = -1  # the state was captured: the caller may change it now
        gate.open()
        pending.wait()
        assert pending.done()
        assert manager.latest_checkpoint == f"{gated}/ckpt-1"
        assert manager.restore()["w"].tolist() == np.arange(100.0).tolist()


def test_sync_checkpoint_interval(directory: str) -> None:
    with anyckpt.sync.CheckpointManager(directory, checkpoint_interval=2) as manager:
        skipped = [manager.save(state(s), step=s).skipped for s in range(5)]
        manager.wait()
        assert skipped == [False, True, False, True, False]
        assert manager.checkpoints == [f"{directory}/ckpt-{s}" for s in (0, 2, 4)]


def test_sync_error_surfaces_on_pending_wait(gated: str) -> None:
    HOOK.fn = fail_commit_of("/ckpt-1.index")
    with anyckpt.sync.CheckpointManager(gated) as manager:
        pending = manager.save(state(1), step=1)
        with pytest.raises(InjectedFault):
            pending.wait()
        manager.wait()  # reported once
        assert manager.latest_checkpoint is None
    assert names_in(gated) == set()


def test_sync_error_surfaces_on_wait_and_the_next_save(gated: str) -> None:
    HOOK.fn = fail_commit_of("/ckpt-1.index")
    with anyckpt.sync.CheckpointManager(gated) as manager:
        manager.save(state(1), step=1)
        with pytest.raises(InjectedFault):
            manager.wait()
        HOOK.fn = fail_commit_of("/ckpt-2.index")
        manager.save(state(2), step=2)
        with pytest.raises(InjectedFault, match="ckpt-2"):
            manager.save(state(3), step=3)  # max_pending=1: waits for save 2, reports it
        HOOK.fn = None
        manager.save(state(4), step=4).wait()
        assert manager.checkpoints == [f"{gated}/ckpt-4"]
    assert names_in(gated) == {"checkpoint", "ckpt-4.index", "ckpt-4.data-00000-of-00001"}


def test_sync_error_surfaces_on_leaving_with(gated: str) -> None:
    HOOK.fn = fail_commit_of("/ckpt-1.index")
    body_done = False
    with pytest.raises(InjectedFault), anyckpt.sync.CheckpointManager(gated) as manager:  # noqa: PT012
        manager.save(state(1), step=1)
        body_done = True
    assert body_done
    assert names_in(gated) == set()


def test_sync_body_error_propagates_and_captured_saves_commit(directory: str) -> None:
    manager = anyckpt.sync.CheckpointManager(directory)
    with pytest.raises(ZeroDivisionError), manager:  # noqa: PT012
        pending = manager.save(state(1), step=1)
        1 / 0  # noqa: B018
    assert pending.done()
    assert anyckpt.sync.latest_checkpoint(directory) == f"{directory}/ckpt-1"
    check(anyckpt.sync.load(f"{directory}/ckpt-1"), 1)


def test_sync_manager_must_be_entered(directory: str) -> None:
    manager = anyckpt.sync.CheckpointManager(directory)
    with pytest.raises(RuntimeError, match="with"):
        manager.save(state(1))
    with pytest.raises(RuntimeError, match="with"):
        manager.restore()


@pytest.mark.parametrize(
    ("case", "latest", "paths"),
    [
        ("tf2_object", "ckpt-4", ("ckpt-2", "ckpt-3", "ckpt-4")),
        ("v2_max_to_keep", "model.ckpt-4", ("model.ckpt-3", "model.ckpt-4")),
    ],
)
def test_sync_module_functions_on_tensorflow_directories(
    case: str, latest: str, paths: tuple[str, ...]
) -> None:
    fixture = FIXTURES / case
    assert (fixture / "checkpoint").is_file(), f"TF fixture {fixture} is missing"
    raw = decode_state((fixture / "checkpoint").read_bytes())
    assert anyckpt.sync.latest_checkpoint(str(fixture)) == f"{fixture}/{latest}"
    got = anyckpt.sync.get_checkpoint_state(str(fixture))
    assert got == anyckpt.CheckpointState(
        f"{fixture}/{latest}",
        tuple(f"{fixture}/{p}" for p in paths),
        raw.all_model_checkpoint_timestamps,
        raw.last_preserved_timestamp,
    )


def test_sync_module_functions_without_a_state_file(tmp_path: Path) -> None:
    anyckpt.sync.save(str(tmp_path / "ckpt-1"), {"x": np.ones(1)})
    assert anyckpt.sync.latest_checkpoint(str(tmp_path)) is None
    assert anyckpt.sync.get_checkpoint_state(str(tmp_path)) is None
    assert anyckpt.sync.latest_checkpoint(str(tmp_path / "nothing-here")) is None

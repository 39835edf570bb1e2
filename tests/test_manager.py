"""The async CheckpointManager (issue 3): saves, restore, back-pressure, errors, cancellation,
retention, the state file, and TensorFlow's directories.

Every async test runs under asyncio and trio. Storages: ``memory://``, local disk, and S3/GCS
through the local test servers (``s3_bucket``/``gcs_bucket``). Slow or failing storage is a
``memory://`` filesystem with a hook (:class:`HookedMemoryFS`), never a mock of anyckpt.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import fsspec
import ml_dtypes
import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.utils import stringify_path

import anyckpt
from anyckpt import CheckpointManager, CheckpointState, SaveEvent, UnsafePathError
from anyckpt.codecs.state_file import decode_state, encode_state
from anyckpt.lease import LOCK_FILE
from anyckpt.storage import TEMP_MARKER

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

HOUR = 3600.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- a memory:// filesystem with a hook: to make writes slow (gated) or fail ----------------


class InjectedFault(OSError):
    """The error a hook raises; tests look for exactly this one."""


@dataclass
class _Hook:
    fn: Callable[[str, str], None] | None = None


HOOK = _Hook()


class _HookedWriteFile(io.BytesIO):
    """A file being written: visible (committed) only when closed, like an object-store PUT."""

    def __init__(self, fs: HookedMemoryFS, path: str) -> None:
        super().__init__()
        self.fs = fs
        self.path = path
        self._finished = False

    def close(self) -> None:
        if not self._finished:
            self.fs.call_hook("commit", self.path)  # may raise: then nothing becomes visible
            self._finished = True
            MemoryFile(self.fs, self.path, self.getvalue()).commit()
        super().close()

    def discard(self) -> None:
        self._finished = True
        super().close()

    def __del__(self) -> None:  # never commit from the garbage collector
        pass


class HookedMemoryFS(MemoryFileSystem):
    """``hookedmem://``: memory:// with its own store, calling ``HOOK.fn(op, path)`` with op
    ``"open"`` (a file opened for writing), ``"commit"`` (it is about to become visible) or
    ``"remove"``."""

    protocol = "hookedmem"
    store: ClassVar[dict[str, Any]] = {}  # type: ignore[misc]
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = stringify_path(path).removeprefix(f"{cls.protocol}://")
        return str(super()._strip_protocol(text))

    def call_hook(self, op: str, path: str) -> None:
        if HOOK.fn is not None and LOCK_FILE not in path:  # the directory lock is no step
            HOOK.fn(op, path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "x" in mode:
            path = self._strip_protocol(path)
            self.call_hook("open", path)
            return _HookedWriteFile(self, path)
        return super()._open(path, mode, **kwargs)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        """anyckpt commits a file on a non-object store by moving its temporary over it."""
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self.call_hook("commit", path2)
        self.store[path2] = self.store.pop(path1)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self.call_hook("remove", path)
        super().rm_file(path)


fsspec.register_implementation("hookedmem", HookedMemoryFS, clobber=True)


class Gate:
    """Blocks the writer threads of matching files (at open, before any byte is written)
    until :meth:`open` is called."""

    def __init__(self, match: Callable[[str], bool] = lambda path: True) -> None:
        self.match = match
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, op: str, path: str) -> None:
        if op == "open" and self.match(path) and not self.opened.is_set():
            self.entered.set()
            if not self.opened.wait(timeout=30):
                raise TimeoutError("test gate never opened")

    def open(self) -> None:
        self.opened.set()

    async def wait_entered(self) -> None:
        """Until a writer is blocked at the gate."""
        assert await anyio.to_thread.run_sync(self.entered.wait, 30)


def fail_when(op: str, match: Callable[[str], bool]) -> Callable[[str, str], None]:
    """A hook raising InjectedFault on ``op`` of matching paths."""

    def hook(actual_op: str, path: str) -> None:
        if actual_op == op and match(path):
            raise InjectedFault(f"injected failure: {op} {path}")

    return hook


def _chain(*hooks: Callable[[str, str], None]) -> Callable[[str, str], None]:
    def hook(op: str, path: str) -> None:
        for h in hooks:
            h(op, path)

    return hook


@contextlib.contextmanager
def raises_injected() -> Iterator[None]:
    """Like ``pytest.raises``, for an error carrying an InjectedFault (a failed shard comes
    out of the format's task group as an ExceptionGroup around it)."""
    try:
        yield
    except BaseException as exc:
        if find_fault(exc) is None:
            raise
        return
    pytest.fail("the injected failure was not raised")


@pytest.fixture
def hooked() -> Iterator[str]:
    """A fresh ``hookedmem://`` directory; the hook is reset around the test."""
    HOOK.fn = None
    root = f"/run-{uuid.uuid4().hex[:12]}"
    yield f"hookedmem://{root.lstrip('/')}"
    HOOK.fn = None
    for key in [k for k in HookedMemoryFS.store if k.startswith(root + "/")]:
        del HookedMemoryFS.store[key]


def hooked_names(url: str) -> set[str]:
    root = "/" + url.removeprefix("hookedmem://")
    return {k[len(root) + 1 :] for k in HookedMemoryFS.store if k.startswith(root + "/")}


def find_fault(exc: BaseException) -> InjectedFault | None:
    """The InjectedFault in ``exc``, its exception groups, causes or contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InjectedFault):
            return e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


# -- where checkpoints go -------------------------------------------------------------------


@dataclass
class Where:
    """A checkpoint directory on one storage, and a way to look at it behind anyckpt's back."""

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

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{name}", data)

    def manager(self, **kwargs: Any) -> CheckpointManager:
        return CheckpointManager(self.url, storage_options=self.options, **kwargs)


def _memory_where() -> Iterator[Where]:
    root = f"/anyckpt-manager-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("memory")
    yield Where(f"memory://{root.lstrip('/')}", None, fs, root)
    for key in [k for k in fs.store if k.startswith(root + "/")]:
        del fs.store[key]


@pytest.fixture
def mem() -> Iterator[Where]:
    yield from _memory_where()


@pytest.fixture
def local(tmp_path: Path) -> Where:
    directory = tmp_path / "ckpts"
    return Where(str(directory), None, fsspec.filesystem("file"), str(directory))


@pytest.fixture(params=["memory", "local", "s3", "gcs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Where]:
    """The same directory semantics on every storage."""
    kind = request.param
    if kind == "memory":
        yield from _memory_where()
    elif kind == "local":
        directory = tmp_path / "ckpts"
        yield Where(str(directory), None, fsspec.filesystem("file"), str(directory))
    else:
        bucket = request.getfixturevalue(f"{kind}_bucket")
        yield Where(
            f"{bucket.url}/run", bucket.storage_options, bucket.filesystem(), f"{bucket.name}/run"
        )


# -- states ---------------------------------------------------------------------------------


def state_for(step: int) -> dict[str, Any]:
    """A nested training state whose every value depends on ``step``."""
    return {
        "model": {
            "dense": {
                "w": np.arange(12, dtype=np.float32).reshape(3, 4) * step,
                "b": np.full(4, step, dtype=np.float64),
            },
            "emb": (np.arange(6, dtype=np.float32) + step).astype(ml_dtypes.bfloat16),
        },
        "opt": {"count": np.int64(step), "mask": np.array([True, step % 2 == 0])},
        "tags": np.array([b"run", b"step-%d" % step], dtype=object),
        "lr": [0.5 * step, 0.25],  # anything numpy.asarray accepts
        "step": step,
    }


def flat_expected(step: int) -> dict[str, np.ndarray]:
    s = state_for(step)
    return {
        "model/dense/w": s["model"]["dense"]["w"],
        "model/dense/b": s["model"]["dense"]["b"],
        "model/emb": s["model"]["emb"],
        "opt/count": np.asarray(s["opt"]["count"]),
        "opt/mask": s["opt"]["mask"],
        "tags": s["tags"],
        "lr": np.asarray(s["lr"]),
        "step": np.asarray(step),
    }


def assert_same(actual: Mapping[str, np.ndarray], expected: Mapping[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        want = np.asarray(want)
        got = actual[key]
        assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
        assert got.shape == want.shape, (key, got.shape, want.shape)
        if want.dtype == object:
            assert got.reshape(-1).tolist() == want.reshape(-1).tolist(), key
        else:
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key


def ckpt_files(step: int, name: str = "ckpt", shards: int = 1) -> set[str]:
    return {f"{name}-{step}.index"} | {
        f"{name}-{step}.data-{i:05d}-of-{shards:05d}" for i in range(shards)
    }


def files_of(*steps: int) -> set[str]:
    out = {"checkpoint"}
    for step in steps:
        out |= ckpt_files(step)
    return out


class Clock:
    """An injectable clock; tests set ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- save and restore -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_restore_right_after_save_sees_that_save(hooked: str) -> None:
    """restore() waits for saves in flight, as TF's synchronous Saver would have written it."""
    gate = Gate()
    HOOK.fn = gate
    async with CheckpointManager(hooked, max_pending=2) as manager:
        await manager.save(state_for(1), step=1)
        pending = await manager.save(state_for(2), step=2)
        assert not pending.done()
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, gate.open)
            restored = await manager.restore()
        assert pending.done()
        assert manager.latest_step == 2
    assert_same(restored, flat_expected(2))


@pytest.mark.anyio
async def test_save_restore_round_trip(where: Where) -> None:
    async with where.manager(max_to_keep=3) as manager:
        assert manager.latest_checkpoint is None
        assert manager.checkpoints == []
        assert manager.latest_step is None
        pending = await manager.save(state_for(1), step=1)
        assert pending.step == 1
        assert pending.prefix == f"{where.url}/ckpt-1"
        assert not pending.skipped
        assert await pending is pending
        assert pending.done()
        assert manager.latest_checkpoint == f"{where.url}/ckpt-1"
        assert manager.latest_step == 1
        assert_same(await manager.restore(), flat_expected(1))

        await manager.save(state_for(2), step=2)
        await manager.wait()
        assert manager.checkpoints == [f"{where.url}/ckpt-1", f"{where.url}/ckpt-2"]
        assert_same(await manager.restore(), flat_expected(2))
        assert_same(await manager.restore(step=1), flat_expected(1))
        part = await manager.restore(keys=["model/dense/w", "tags"])
        assert_same(part, {k: flat_expected(2)[k] for k in ("model/dense/w", "tags")})

    assert where.names() == files_of(1, 2)
    assert await anyckpt.latest_checkpoint(where.url, storage_options=where.options) == (
        f"{where.url}/ckpt-2"
    )
    state = decode_state(where.read("checkpoint"))
    assert state.model_checkpoint_path == "ckpt-2"
    assert state.all_model_checkpoint_paths == ("ckpt-1", "ckpt-2")
    # what the manager wrote is an ordinary bundle anyckpt.load reads
    assert_same(
        await anyckpt.load(f"{where.url}/ckpt-1", storage_options=where.options), flat_expected(1)
    )
    # a new manager on the directory sees the same committed state
    async with where.manager(max_to_keep=3) as again:
        assert again.checkpoints == [f"{where.url}/ckpt-1", f"{where.url}/ckpt-2"]
        assert again.latest_step == 2
        assert_same(await again.restore(), flat_expected(2))


@pytest.mark.anyio
async def test_nested_state_is_flattened_to_slash_names(mem: Where) -> None:
    async with mem.manager() as manager:
        await (await manager.save({"a": {"b": {"c": np.ones(2)}}, "a/b/d": np.zeros(1)}, step=1))
        assert sorted(await manager.restore()) == ["a/b/c", "a/b/d"]
        # two spellings of one name are refused before anything is captured or written
        with pytest.raises(ValueError, match="same name"):
            await manager.save({"a": {"b": np.ones(1)}, "a/b": np.zeros(1)}, step=2)
        assert manager.checkpoints == [f"{mem.url}/ckpt-1"]
    assert mem.names() == files_of(1)


@pytest.mark.anyio
async def test_step_none_continues_after_the_latest(mem: Where) -> None:
    async with mem.manager(max_to_keep=None) as manager:
        assert (await manager.save(state_for(1))).step == 1  # TF's save counter starts at 1
        assert (await manager.save(state_for(2))).step == 2
        assert (await manager.save(state_for(10), step=10)).step == 10
        last = await manager.save(state_for(11))
        assert last.step == 11
        await manager.wait()
    async with mem.manager(max_to_keep=None) as manager:  # numbering survives a restart
        assert (await (await manager.save(state_for(12)))).prefix == f"{mem.url}/ckpt-12"
        assert_same(await manager.restore(step=11), flat_expected(11))
    assert mem.names() == files_of(1, 2, 10, 11, 12)


@pytest.mark.anyio
async def test_steps_must_increase(mem: Where) -> None:
    async with mem.manager() as manager:
        await manager.save(state_for(5), step=5)
        for bad in (5, 3, -1):
            with pytest.raises(ValueError, match="step"):
                await manager.save(state_for(bad), step=bad)
        await manager.wait()
        assert manager.checkpoints == [f"{mem.url}/ckpt-5"]
        assert (await manager.save(state_for(6))).step == 6  # refusals changed nothing
    async with mem.manager() as manager:
        with pytest.raises(ValueError, match="not after"):  # nor does a restart forget
            await manager.save(state_for(6), step=6)
    assert mem.names() == files_of(5, 6)


@pytest.mark.anyio
async def test_checkpoint_interval_skips_and_says_so(mem: Where) -> None:
    async with mem.manager(max_to_keep=None, checkpoint_interval=3) as manager:
        saved, skipped = [], []
        for step in range(0, 10):
            pending = await manager.save(state_for(step), step=step)
            (skipped if pending.skipped else saved).append(step)
            if pending.skipped:
                assert pending.done()
                assert pending.prefix is None
                assert await pending is pending  # nothing to wait for, no error
                assert pending.event is None
        await manager.wait()
        assert saved == [0, 3, 6, 9]
        assert skipped == [1, 2, 4, 5, 7, 8]
        assert manager.latest_step == 9
    assert mem.names() == files_of(0, 3, 6, 9)


@pytest.mark.anyio
async def test_save_captures_a_copy(hooked: str) -> None:
    """copy=True: mutating the arrays right after save() returns changes nothing saved. The
    write is held at the gate until after the mutation, so the test cannot pass by luck."""
    gate = Gate()
    HOOK.fn = gate
    w = np.arange(1000, dtype=np.float32)
    nested = {"w": w, "inner": {"v": np.ones((3, 3))}}
    async with CheckpointManager(hooked) as manager:
        pending = await manager.save(nested, step=1)
        w[:] = -1
        nested["inner"]["v"] *= 7
        nested["w"] = np.zeros(3)  # rebinding is harmless too
        assert not pending.done()
        gate.open()
        await pending
        restored = await manager.restore()
    assert restored["w"].tolist() == np.arange(1000, dtype=np.float32).tolist()
    assert restored["inner/v"].tolist() == np.ones((3, 3)).tolist()


def _many_small() -> dict[str, Any]:
    return {f"layer_{i:03d}/kernel": np.full(256, i, dtype=np.float32) for i in range(3000)}


def _varied() -> dict[str, Any]:
    return {
        f"layer_{i:03d}/{part}": np.full((16, 16) if part == "kernel" else (16,), i, np.float32)
        for i in range(1500)
        for part in ("kernel", "bias")
    }


def _strided() -> dict[str, Any]:
    return {f"w{i}": np.full((32, 16), i, dtype=np.float64)[:, ::2] for i in range(500)}


@pytest.mark.anyio
@pytest.mark.parametrize("make", [_many_small, _varied, _strided])
async def test_save_captures_many_tensors(hooked: str, make: Callable[[], dict[str, Any]]) -> None:
    """As above, for thousands of small tensors (copied as one block when they share a dtype
    and shape, one by one otherwise): every array is overwritten in place right after save()
    returns, before the gated write starts, and the checkpoint still holds the values saved."""
    gate = Gate()
    HOOK.fn = gate
    state = make()
    expected = {k: v.copy() for k, v in state.items()}
    async with CheckpointManager(hooked) as manager:
        pending = await manager.save({"model": state}, step=1)
        for value in state.values():
            value[...] = -1
        assert not pending.done()
        gate.open()
        await pending
        restored = await manager.restore()
    assert sorted(restored) == sorted(f"model/{k}" for k in expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(restored[f"model/{key}"], value)


@pytest.mark.anyio
async def test_copy_false_writes_the_callers_buffer(hooked: str) -> None:
    """copy=False takes the caller's promise: no copy is made (the write sees the buffer).
    (With the stale-snapshot guard off: on, it fails this save; see test_stale_snapshot.)"""
    gate = Gate()
    HOOK.fn = gate
    w = np.arange(8, dtype=np.int32)
    async with CheckpointManager(hooked, stale_check=None) as manager:
        pending = await manager.save({"w": w}, step=1, copy=False)
        w[:] = 42
        gate.open()
        await pending
        assert (await manager.restore())["w"].tolist() == [42] * 8


@pytest.mark.anyio
@pytest.mark.parametrize("max_pending", [1, 2])
async def test_max_pending_back_pressure(hooked: str, max_pending: int) -> None:
    gate = Gate()
    HOOK.fn = gate
    async with CheckpointManager(hooked, max_to_keep=None, max_pending=max_pending) as manager:
        pendings = [await manager.save(state_for(s), step=s) for s in range(1, max_pending + 1)]
        await gate.wait_entered()
        assert not any(p.done() for p in pendings)

        returned: list[anyckpt.PendingSave] = []

        async def one_more() -> None:
            returned.append(await manager.save(state_for(max_pending + 1)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one_more)
            await anyio.wait_all_tasks_blocked()
            assert returned == []  # the (max_pending+1)-th save waits for a slot
            assert manager.latest_checkpoint is None
            gate.open()
        assert returned[0].step == max_pending + 1
        await manager.wait()
        assert [p.done() for p in [*pendings, *returned]] == [True] * (max_pending + 1)
        assert manager.latest_step == max_pending + 1
        assert_same(await manager.restore(), flat_expected(max_pending + 1))
    assert hooked_names(hooked) == files_of(*range(1, max_pending + 2))


# -- errors ---------------------------------------------------------------------------------


def _data_of(step: int) -> Callable[[str], bool]:
    return lambda path: f"/ckpt-{step}.data-" in path


@pytest.mark.anyio
async def test_error_surfaces_on_await_pending(hooked: str) -> None:
    HOOK.fn = fail_when("commit", _data_of(2))
    async with CheckpointManager(hooked) as manager:
        await (await manager.save(state_for(1), step=1))
        pending = await manager.save(state_for(2), step=2)
        with raises_injected():
            await pending
        assert pending.done()
        await manager.wait()  # seen once: not raised again
        assert manager.latest_step == 1
    # seen: leaving the block does not raise it again; nothing of step 2 stays
    assert hooked_names(hooked) == files_of(1)


@pytest.mark.anyio
async def test_error_surfaces_on_wait(hooked: str) -> None:
    HOOK.fn = fail_when("commit", lambda p: p.endswith("/ckpt-1.index"))
    async with CheckpointManager(hooked) as manager:
        await manager.save(state_for(1), step=1)
        with raises_injected():
            await manager.wait()
        await manager.wait()  # reported once
        HOOK.fn = None
        await (await manager.save(state_for(2)))  # the manager still works
        assert manager.checkpoints == [f"{hooked}/ckpt-2"]
    assert hooked_names(hooked) == files_of(2)


@pytest.mark.anyio
async def test_error_surfaces_on_the_next_save(hooked: str) -> None:
    """With max_pending=1 the next save() waits for the failing one, then reports its error
    instead of starting (and does not write anything)."""
    HOOK.fn = fail_when("commit", _data_of(1))
    async with CheckpointManager(hooked, max_pending=1) as manager:
        await manager.save(state_for(1), step=1)
        with raises_injected():
            await manager.save(state_for(2), step=2)
        HOOK.fn = None
        await (await manager.save(state_for(3), step=3))  # reported once; saving goes on
        assert manager.checkpoints == [f"{hooked}/ckpt-3"]
    assert hooked_names(hooked) == files_of(3)


@pytest.mark.anyio
async def test_error_surfaces_on_leaving_async_with(hooked: str) -> None:
    gate = Gate(_data_of(1))
    HOOK.fn = _chain(gate, fail_when("commit", _data_of(1)))
    body_done = False
    with raises_injected():
        async with CheckpointManager(hooked, max_pending=2) as manager:
            await manager.save(state_for(1), step=1)
            await manager.save(state_for(2), step=2)  # later and successful: no masking
            gate.open()
            body_done = True
    assert body_done  # raised on leaving, not before
    assert manager.latest_step == 2
    assert hooked_names(hooked) == files_of(2)


@pytest.mark.anyio
async def test_error_in_the_body_propagates_unchanged_and_captured_saves_commit(
    mem: Where,
) -> None:
    """An ordinary exception in the training loop is re-raised as is (not wrapped in an
    ExceptionGroup) and saves already captured still commit."""
    with pytest.raises(KeyError, match="from the loop") as info:  # noqa: PT012
        async with mem.manager() as manager:
            pending = await manager.save(state_for(1), step=1)
            raise KeyError("from the loop")
    assert type(info.value) is KeyError
    assert pending.done()
    await pending
    assert await anyckpt.latest_checkpoint(mem.url) == f"{mem.url}/ckpt-1"
    assert mem.names() == files_of(1)


@pytest.mark.anyio
async def test_error_in_the_body_names_a_failed_save(hooked: str) -> None:
    """The body's exception propagates unchanged, and a background failure nobody saw is not
    swallowed: it is attached to it as a note."""
    HOOK.fn = fail_when("commit", lambda p: p.endswith("/ckpt-1.index"))
    with pytest.raises(KeyError, match="from the loop") as info:  # noqa: PT012
        async with CheckpointManager(hooked) as manager:
            pending = await manager.save(state_for(1), step=1)
            with anyio.fail_after(10):
                while not pending.done():
                    await anyio.sleep(0.005)
            raise KeyError("from the loop")
    assert type(info.value) is KeyError
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == (1 if sys.version_info >= (3, 11) else 0)
    if notes:
        assert "step 1" in notes[0]
        assert "InjectedFault" in notes[0]
    assert hooked_names(hooked) == set()


# -- cancellation ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancel_while_writing_leaves_no_trace(hooked: str) -> None:
    async with CheckpointManager(hooked) as manager:
        await (await manager.save(state_for(1), step=1))
    before = HookedMemoryFS.store["/" + hooked.removeprefix("hookedmem://") + "/checkpoint"]
    state_before = bytes(before.getbuffer())

    gate = Gate(_data_of(2))
    HOOK.fn = gate
    with anyio.CancelScope() as scope:
        async with CheckpointManager(hooked) as manager:
            pending = await manager.save(state_for(2), step=2)
            await gate.wait_entered()  # the data file is being written
            scope.cancel()
            gate.open()
            await anyio.sleep(30)
    assert scope.cancelled_caught
    assert pending.done()
    with pytest.raises(anyckpt.CheckpointError, match="cancelled"):
        await pending
    assert hooked_names(hooked) == files_of(1)
    root = "/" + hooked.removeprefix("hookedmem://")
    assert bytes(HookedMemoryFS.store[root + "/checkpoint"].getbuffer()) == state_before
    async with CheckpointManager(hooked) as manager:
        assert manager.latest_step == 1
        assert_same(await manager.restore(), flat_expected(1))


@pytest.mark.anyio
async def test_cancel_after_the_write_before_the_commit_leaves_no_trace(hooked: str) -> None:
    """Save 2 is fully written (its index exists) but waits for save 1 to commit first; a
    cancellation then must remove it: it was never committed."""
    gate = Gate(_data_of(1))
    HOOK.fn = gate
    root = "/" + hooked.removeprefix("hookedmem://")
    with anyio.CancelScope() as scope:
        async with CheckpointManager(hooked, max_pending=2) as manager:
            first = await manager.save(state_for(1), step=1)
            second = await manager.save(state_for(2), step=2)
            await gate.wait_entered()
            while root + "/ckpt-2.index" not in HookedMemoryFS.store:
                await anyio.sleep(0.005)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            gate.open()
            await anyio.sleep(30)
    assert scope.cancelled_caught
    for pending in (first, second):
        with pytest.raises(anyckpt.CheckpointError, match="cancelled"):
            await pending
    assert hooked_names(hooked) == set()
    assert await anyckpt.latest_checkpoint(hooked) is None


# -- observability --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_on_event_reports_bytes_and_timings(mem: Where) -> None:
    events: list[SaveEvent] = []
    async with mem.manager(max_to_keep=1, on_event=events.append) as manager:
        first = await (await manager.save({"w": np.ones((10, 10)), "n": np.int32(3)}, step=1))
        second = await (await manager.save({"w": np.ones(5, dtype=np.float32)}, step=2))
    assert [e.step for e in events] == [1, 2]
    assert events == [first.event, second.event]
    one, two = events
    assert one.prefix == f"{mem.url}/ckpt-1"
    assert one.bytes == 10 * 10 * 8 + 4
    assert two.bytes == 5 * 4
    for event in events:
        for seconds in (
            event.capture_seconds,
            event.write_seconds,
            event.commit_seconds,
            event.blocked_seconds,
        ):
            assert isinstance(seconds, float)
            assert 0 <= seconds < 60
        # save() held the caller for the capture and more (checks, waiting for a slot)
        assert event.blocked_seconds >= event.capture_seconds
        assert event.throughput == pytest.approx(event.bytes / event.write_seconds)
    assert one.deleted == ()
    assert two.deleted == (f"{mem.url}/ckpt-1",)
    assert two.preserved == ()


# -- retention ------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["memory", "local"])
async def test_max_to_keep(kind: str, request: pytest.FixtureRequest) -> None:
    where: Where = request.getfixturevalue("mem" if kind == "memory" else "local")
    events: list[SaveEvent] = []
    async with where.manager(max_to_keep=2, on_event=events.append) as manager:
        for step in range(1, 6):
            await (await manager.save(state_for(step), step=step))
            assert where.names() == files_of(*range(max(1, step - 1), step + 1))
        assert manager.checkpoints == [f"{where.url}/ckpt-4", f"{where.url}/ckpt-5"]
    assert [e.deleted for e in events] == [
        (),
        (),
        (f"{where.url}/ckpt-1",),
        (f"{where.url}/ckpt-2",),
        (f"{where.url}/ckpt-3",),
    ]
    state = decode_state(where.read("checkpoint"))
    assert state.all_model_checkpoint_paths == ("ckpt-4", "ckpt-5")
    assert state.model_checkpoint_path == "ckpt-5"
    assert len(state.all_model_checkpoint_timestamps) == 2


@pytest.mark.anyio
async def test_max_to_keep_none_keeps_everything(mem: Where) -> None:
    async with mem.manager(max_to_keep=None) as manager:
        for step in range(1, 8):
            await manager.save(state_for(step))
    assert mem.names() == files_of(*range(1, 8))
    assert len(decode_state(mem.read("checkpoint")).all_model_checkpoint_paths) == 7


@pytest.mark.anyio
async def test_keep_checkpoint_every_n_hours_with_a_clock_and_a_restart(local: Where) -> None:
    """max_to_keep=2, one preserved per hour. Preserved checkpoints stay on disk and leave the
    state file; deleted ones leave no file; a restarted manager goes on with the policy."""
    clock = Clock(0.0)  # start: last_preserved = -1
    events: list[SaveEvent] = []
    times = {1: 4000.0, 2: 5000.0, 3: 6000.0, 4: 7000.0, 5: 9000.0, 6: 10000.0, 7: 13000.0}
    opts: dict[str, Any] = {"max_to_keep": 2, "keep_checkpoint_every_n_hours": 1, "clock": clock}
    async with local.manager(on_event=events.append, **opts) as manager:
        for step, now in times.items():
            clock.now = now
            await (await manager.save(state_for(step), step=step))
    # leaving the window: 1 (4000-3600 >= -1: preserved, last=4000), 2, 3, 4 (less than an
    # hour after 4000: deleted), 5 (9000-3600 >= 4000: preserved, last=9000)
    assert [e.preserved for e in events] == [
        (),
        (),
        (f"{local.url}/ckpt-1",),
        (),
        (),
        (),
        (f"{local.url}/ckpt-5",),
    ]
    assert [e.deleted for e in events] == [
        (), (), (), (f"{local.url}/ckpt-2",), (f"{local.url}/ckpt-3",),
        (f"{local.url}/ckpt-4",), (),
    ]  # fmt: skip
    assert local.names() == files_of(1, 5, 6, 7)
    state = decode_state(local.read("checkpoint"))
    assert state == CheckpointState("ckpt-7", ("ckpt-6", "ckpt-7"), (10000.0, 13000.0), 9000.0)

    clock.now = 14000.0
    events.clear()
    async with local.manager(on_event=events.append, **opts) as manager:
        assert manager.checkpoints == [f"{local.url}/ckpt-6", f"{local.url}/ckpt-7"]
        await (await manager.save(state_for(8)))  # 6 leaves: 10000-3600 < 9000, deleted
        clock.now = 15000.0
        await (await manager.save(state_for(9)))  # 7 leaves: 13000-3600 >= 9000, preserved
    assert [(e.deleted, e.preserved) for e in events] == [
        ((f"{local.url}/ckpt-6",), ()),
        ((), (f"{local.url}/ckpt-7",)),
    ]
    assert local.names() == files_of(1, 5, 7, 8, 9)
    assert decode_state(local.read("checkpoint")) == CheckpointState(
        "ckpt-9", ("ckpt-8", "ckpt-9"), (14000.0, 15000.0), 13000.0
    )
    for step in (1, 5, 7):  # preserved checkpoints are intact
        assert_same(await anyckpt.load(f"{local.url}/ckpt-{step}"), flat_expected(step))


@pytest.mark.anyio
async def test_retention_state_survives_restarts(where: Where) -> None:
    async with where.manager(max_to_keep=3) as manager:
        for step in (1, 2, 3):
            await manager.save(state_for(step), step=step)
    assert where.names() == files_of(1, 2, 3)
    async with where.manager(max_to_keep=3) as manager:
        assert manager.checkpoints == [f"{where.url}/ckpt-{s}" for s in (1, 2, 3)]
        await (await manager.save(state_for(4)))
        assert where.names() == files_of(2, 3, 4)
    async with where.manager(max_to_keep=1) as manager:  # a lower limit applies at the next save
        assert len(manager.checkpoints) == 3
        await (await manager.save(state_for(5)))
        assert manager.checkpoints == [f"{where.url}/ckpt-5"]
    assert where.names() == files_of(5)
    assert decode_state(where.read("checkpoint")).all_model_checkpoint_paths == ("ckpt-5",)


# -- a hostile state file -------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


HOSTILE = [
    "../outside/ckpt-1",
    "ckpt-1/../../outside/ckpt-1",
    "{outside}/ckpt-1",
    "file://{outside}/ckpt-1",
    "s3://bucket/ckpt-1",
    "memory://outside/ckpt-1",
    "..",
    "C:\\outside\\ckpt-1",
]


@pytest.mark.anyio
@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("where_in_file", ["tracked", "latest"])
async def test_hostile_state_file_is_refused_and_nothing_is_deleted(
    tmp_path: Path, hostile: str, where_in_file: str
) -> None:
    directory = tmp_path / "run" / "ckpts"
    outside = tmp_path / "run" / "outside"
    # checkpoints in and around the directory, and debris the manager would otherwise clean
    for d, step in ((directory, 1), (directory, 2), (outside, 1)):
        anyckpt.sync.save(str(d / f"ckpt-{step}"), {"x": np.arange(step + 1)})
    (outside / "sentinel.txt").write_text("do not touch")
    (tmp_path / "sentinel.txt").write_text("do not touch either")
    (directory / f"ckpt-3.data-00000-of-00001{TEMP_MARKER}dead").write_bytes(b"debris")
    (directory / "ckpt-9.data-00000-of-00001").write_bytes(b"orphan")
    path = hostile.format(outside=outside)
    if where_in_file == "tracked":
        state = CheckpointState("ckpt-2", (path, "ckpt-2"), (100.0, 200.0), 50.0)
    else:
        state = CheckpointState(path, ("ckpt-1", "ckpt-2"), (100.0, 200.0), 50.0)
    (directory / "checkpoint").write_bytes(encode_state(state))
    before = _snapshot(tmp_path)

    manager = CheckpointManager(directory, max_to_keep=1, clock=lambda: 1000.0)
    with pytest.raises(UnsafePathError):
        async with manager:
            await manager.save({"x": np.zeros(1)})
    with pytest.raises(UnsafePathError):
        await anyckpt.latest_checkpoint(str(directory))
    with pytest.raises(UnsafePathError):
        anyckpt.sync.get_checkpoint_state(str(directory))
    assert _snapshot(tmp_path) == before


@pytest.mark.anyio
async def test_absolute_paths_inside_the_directory_are_accepted(tmp_path: Path) -> None:
    """What the tf.compat.v1 Saver writes with save_relative_paths=False: absolute paths
    directly inside the directory are the directory's own checkpoints."""
    directory = tmp_path / "ckpts"
    for step in (1, 2):
        anyckpt.sync.save(str(directory / f"ckpt-{step}"), state_for(step))
    state = CheckpointState(
        f"{directory}/ckpt-2", (f"{directory}/ckpt-1", f"{directory}/ckpt-2"), (100.0, 200.0), 50.0
    )
    (directory / "checkpoint").write_bytes(encode_state(state))
    async with CheckpointManager(directory, max_to_keep=2, clock=lambda: 300.0) as manager:
        assert manager.checkpoints == [f"{directory}/ckpt-1", f"{directory}/ckpt-2"]
        await manager.save(state_for(3))
    assert {p.name for p in directory.iterdir()} == files_of(2, 3)


# -- the state file and TensorFlow's directories --------------------------------------------


def _fixture(case: str) -> Path:
    path = FIXTURES / case
    assert (path / "checkpoint").is_file(), f"TF fixture {path} is missing"
    return path


def _fixture_expected(case: str, prefix: str) -> dict[str, np.ndarray]:
    manifest = json.loads((_fixture(case) / "manifest.json").read_text())
    (checkpoint,) = [c for c in manifest["checkpoints"] if c["prefix"] == prefix]
    out = {}
    for key, info in checkpoint["tensors"].items():
        if info["dtype"] == "string":
            flat = np.empty(len(info["values_b64"]), dtype=object)
            for i, b64 in enumerate(info["values_b64"]):
                flat[i] = base64.b64decode(b64)
            out[key] = flat.reshape(info["shape"])
        else:
            array = np.load(_fixture(case) / info["expected"])
            if info["npy_encoding"] == "bfloat16_bits_as_uint16":
                array = array.view(ml_dtypes.bfloat16)
            out[key] = array
    return out


@pytest.mark.anyio
async def test_state_file_is_byte_for_byte_tensorflows(local: Where) -> None:
    """With TensorFlow's clock readings, the manager writes exactly the state file TF's
    CheckpointManager wrote in the tf2_object fixture (4 saves, max_to_keep=3)."""
    tf_bytes = (_fixture("tf2_object") / "checkpoint").read_bytes()
    tf_state = decode_state(tf_bytes)
    clock = Clock(tf_state.last_preserved_timestamp + 1)  # TF: time.time() - 1 at creation
    async with local.manager(max_to_keep=3, clock=clock) as manager:
        for step, now in zip((1, 2, 3, 4), (tf_state.last_preserved_timestamp + 1.1,
                                            *tf_state.all_model_checkpoint_timestamps),
                             strict=True):  # fmt: skip
            clock.now = now
            await (await manager.save(state_for(step)))
    ours = local.read("checkpoint")
    assert ours == tf_bytes
    assert ours == encode_state(tf_state)
    # the structure, line by line: field order, quoting, a final newline
    lines = ours.decode().splitlines(keepends=True)
    assert [line.split(":")[0] for line in lines] == [
        "model_checkpoint_path",
        *["all_model_checkpoint_paths"] * 3,
        *["all_model_checkpoint_timestamps"] * 3,
        "last_preserved_timestamp",
    ]
    assert all(line.endswith("\n") for line in lines)


@pytest.mark.anyio
async def test_state_file_is_what_the_codec_writes(mem: Where) -> None:
    clock = Clock(1_700_000_000.25)
    async with mem.manager(max_to_keep=2, clock=clock) as manager:
        for step in (1, 2, 3):
            clock.now += 0.5
            await (await manager.save(state_for(step)))  # the time is read at the commit
    expected = CheckpointState(
        "ckpt-3", ("ckpt-2", "ckpt-3"), (1_700_000_001.25, 1_700_000_001.75), 1_699_999_999.25
    )
    assert mem.read("checkpoint") == encode_state(expected)


@pytest.mark.anyio
async def test_manager_continues_a_tensorflow_checkpoint_manager_directory(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "tf2_object"
    shutil.copytree(_fixture("tf2_object"), directory)
    for p in directory.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    directory.chmod(0o755)
    tf_state = decode_state((directory / "checkpoint").read_bytes())
    others = {p.name for p in directory.iterdir()} - files_of(2, 3, 4)
    now = tf_state.all_model_checkpoint_timestamps[-1] + 60.0
    async with CheckpointManager(directory, max_to_keep=3, clock=lambda: now) as manager:
        assert manager.latest_checkpoint == f"{directory}/ckpt-4"
        assert manager.latest_step == 4
        assert manager.checkpoints == [f"{directory}/ckpt-{s}" for s in (2, 3, 4)]
        assert_same(await manager.restore(), _fixture_expected("tf2_object", "ckpt-4"))
        assert_same(await manager.restore(step=2), _fixture_expected("tf2_object", "ckpt-2"))
        pending = await manager.save({"x": np.arange(3)})
        await pending
    assert pending.step == 5
    assert pending.event is not None
    assert pending.event.deleted == (f"{directory}/ckpt-2",)
    assert {p.name for p in directory.iterdir()} == files_of(3, 4, 5) | others
    state = decode_state((directory / "checkpoint").read_bytes())
    assert state == CheckpointState(
        "ckpt-5",
        ("ckpt-3", "ckpt-4", "ckpt-5"),
        (*tf_state.all_model_checkpoint_timestamps[1:], now),
        tf_state.last_preserved_timestamp,
    )
    assert_same(
        await anyckpt.load(str(directory / "ckpt-3")), _fixture_expected("tf2_object", "ckpt-3")
    )


@pytest.mark.anyio
async def test_saver_directory_is_read_but_not_adopted(tmp_path: Path) -> None:
    """A tf.compat.v1 Saver directory has no timestamps: as TF's CheckpointManager, the
    manager sees its latest checkpoint but tracks (and so deletes) none of them."""
    directory = tmp_path / "saver"
    shutil.copytree(_fixture("v2_max_to_keep"), directory)
    for p in directory.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    directory.chmod(0o755)
    before = {p.name for p in directory.iterdir()}
    async with CheckpointManager(
        directory, max_to_keep=1, checkpoint_name="model.ckpt", clock=lambda: 2e9
    ) as manager:
        assert manager.latest_checkpoint == f"{directory}/model.ckpt-4"
        assert manager.latest_step == 4
        assert manager.checkpoints == []
        assert_same(await manager.restore(), _fixture_expected("v2_max_to_keep", "model.ckpt-4"))
        await (await manager.save({"x": np.arange(2)}))
        await (await manager.save({"x": np.arange(3)}))
    after = {p.name for p in directory.iterdir()}
    assert after == before | ckpt_files(6, "model.ckpt")
    # the Saver's last_preserved_timestamp (0) is kept: nothing was preserved since
    assert decode_state((directory / "checkpoint").read_bytes()) == CheckpointState(
        "model.ckpt-6", ("model.ckpt-6",), (2e9,), 0.0
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "latest", "paths"),
    [
        ("tf2_object", "ckpt-4", ("ckpt-2", "ckpt-3", "ckpt-4")),
        ("v2_max_to_keep", "model.ckpt-4", ("model.ckpt-3", "model.ckpt-4")),
    ],
)
async def test_module_functions_on_tensorflow_directories(
    case: str, latest: str, paths: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = str(_fixture(case))
    raw = decode_state((_fixture(case) / "checkpoint").read_bytes())
    assert await anyckpt.latest_checkpoint(directory) == f"{directory}/{latest}"
    state = await anyckpt.get_checkpoint_state(directory)
    assert state is not None
    assert state.model_checkpoint_path == f"{directory}/{latest}"
    assert state.all_model_checkpoint_paths == tuple(f"{directory}/{p}" for p in paths)
    assert state.all_model_checkpoint_timestamps == raw.all_model_checkpoint_timestamps
    assert state.last_preserved_timestamp == raw.last_preserved_timestamp
    # relative directories are joined like TF's os.path.join, trailing slash or not
    monkeypatch.chdir(FIXTURES)
    assert await anyckpt.latest_checkpoint(case) == f"{case}/{latest}"
    assert await anyckpt.latest_checkpoint(case + "/") == f"{case}/{latest}"


@pytest.mark.anyio
async def test_module_functions_without_a_state_file(tmp_path: Path, mem: Where) -> None:
    anyckpt.sync.save(str(tmp_path / "ckpt-1"), {"x": np.ones(1)})  # a checkpoint, no state file
    for directory in (str(tmp_path), str(tmp_path / "missing"), mem.url):
        assert await anyckpt.latest_checkpoint(directory) is None
        assert await anyckpt.get_checkpoint_state(directory) is None


# -- misuse ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_restore_without_a_checkpoint(mem: Where) -> None:
    async with mem.manager() as manager:
        with pytest.raises(anyckpt.CheckpointNotFoundError):
            await manager.restore()
        with pytest.raises(anyckpt.CheckpointNotFoundError):
            await manager.restore(step=3)


@pytest.mark.anyio
async def test_manager_must_be_entered_once(mem: Where) -> None:
    manager = mem.manager()
    with pytest.raises(RuntimeError, match="async with"):
        await manager.save({"x": np.ones(1)})
    async with manager:
        pass
    with pytest.raises(RuntimeError, match="once"):
        async with manager:
            pass
    assert mem.names() == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pending": 0},
        {"checkpoint_name": "a/b"},
        {"checkpoint_name": ""},
        {"checkpoint_name": "s3:x"},
        {"checkpoint_interval": 0},
        {"max_to_keep": 0},
        {"keep_checkpoint_every_n_hours": -1.0},
    ],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        CheckpointManager("memory://never-used", **kwargs)

"""Blocking twins of the async API, for ordinary synchronous code.

A one-shot call (:func:`load`, :func:`save`...) runs the async implementation with
``anyio.run`` on the calling thread when that thread runs no event loop (the cheapest way: no
thread to start), and otherwise on an event loop in a background thread (an anyio blocking
portal), so it also works when the calling thread has an event loop of its own (a notebook).
Readers and managers, which outlive one call, always use a portal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import anyio
import numpy as np
from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import api, tf2
from . import manager as _manager
from ._concurrency import on_event_loop
from .codecs.state_file import CheckpointState
from .formats.base import CheckpointReader, Index, TensorSpec
from .formats.v2_reader import NOW_KEYS
from .meta import MetaGraphInfo
from .object_graph import ObjectTree

T = TypeVar("T")


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """``await fn()`` from blocking code: on this thread if it runs no event loop, else on a
    portal's thread. The result is handed out through a closure, not as ``anyio.run``'s
    return value: on CPython 3.11 ``asyncio.Runner`` takes the ``repr()`` of its main task's
    result (a dict of 10,000 arrays: ~5 ms)."""
    if on_event_loop():
        with start_blocking_portal() as portal:
            return portal.call(fn)
    out: list[T] = []

    async def main() -> None:
        out.append(await fn())

    anyio.run(main)
    return out[0]


def save(prefix: api.PathLike, tensors: Mapping[Any, Any], **kwargs: Any) -> list[str]:
    """Blocking :func:`anyckpt.save`."""
    return _run(partial(api.save, prefix, tensors, **kwargs))


def load(
    prefix: api.PathLike, keys: Sequence[str] | None = None, **kwargs: Any
) -> dict[str, np.ndarray]:
    """Blocking :func:`anyckpt.load`. A few keys of a V2 checkpoint on a local disk are read on
    the calling thread when it runs no event loop (no loop or thread to start: about half of
    what restoring a few small tensors takes otherwise)."""
    if (
        keys is not None
        and len(keys) <= NOW_KEYS
        and kwargs.keys() <= _FEW_KEYS_OPTIONS
        and not on_event_loop()
    ):
        few = api.read_few_now(prefix, list(keys), **kwargs)
        if few.result is not None:
            return few.result
        return _run(few.read_rest)
    result: dict[str, np.ndarray] = _run(partial(api.load, prefix, keys, **kwargs))
    return result


#: The options of :func:`load` that :func:`anyckpt.api.read_few_now` takes.
_FEW_KEYS_OPTIONS = {"verify", "storage_options", "allow_symlinks"}


def read_tree(prefix: api.PathLike, **kwargs: Any) -> ObjectTree:
    """Blocking :func:`anyckpt.tf2.read_tree`."""
    return _run(partial(tf2.read_tree, prefix, **kwargs))


def remap(source: api.PathLike, dest: api.PathLike, *args: Any, **kwargs: Any) -> list[str]:
    """Blocking :func:`anyckpt.tf2.remap`."""
    return _run(partial(tf2.remap, source, dest, *args, **kwargs))


def read_meta_graph(path: api.PathLike, **kwargs: Any) -> MetaGraphInfo:
    """Blocking :func:`anyckpt.read_meta_graph`."""
    return _run(partial(api.read_meta_graph, path, **kwargs))


def export_meta_graph(prefix: api.PathLike, **kwargs: Any) -> str:
    """Blocking :func:`anyckpt.export_meta_graph`."""
    return _run(partial(api.export_meta_graph, prefix, **kwargs))


class Reader:
    """A blocking view of a :class:`~anyckpt.formats.base.CheckpointReader`."""

    def __init__(self, reader: CheckpointReader, portal: BlockingPortal) -> None:
        self._reader = reader
        self._portal = portal
        self.prefix = reader.prefix

    def keys(self) -> list[str]:
        return self._reader.keys()

    def spec(self, key: str) -> TensorSpec:
        return self._reader.spec(key)

    def files(self) -> list[str]:
        return self._reader.files()

    def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        return self._portal.call(partial(self._reader.read, key, index, verify=verify))

    def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        return self._portal.call(partial(self._reader.read_many, keys, verify=verify))


class open:
    """``with anyckpt.sync.open(prefix) as reader:`` — blocking :func:`anyckpt.open`."""

    def __init__(self, prefix: api.PathLike, **kwargs: Any) -> None:
        self._args = (prefix, kwargs)
        self._stack = ExitStack()

    def __enter__(self) -> Reader:
        prefix, kwargs = self._args
        portal = self._stack.enter_context(start_blocking_portal())
        try:
            reader = portal.call(partial(api.open_reader, prefix, **kwargs))
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(portal.call, reader.aclose)
        return Reader(reader, portal)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()


class PendingSave:
    """Blocking view of :class:`anyckpt.manager.PendingSave`."""

    def __init__(self, pending: _manager.PendingSave, portal: BlockingPortal) -> None:
        self._pending = pending
        self._portal = portal
        self.step = pending.step
        self.prefix = pending.prefix
        self.skipped = pending.skipped
        self.reason = pending.reason

    @property
    def event(self) -> _manager.SaveEvent | None:
        return self._pending.event

    def done(self) -> bool:
        return self._pending.done()

    def wait(self) -> PendingSave:
        """Block until committed; raise the save's error."""
        self._portal.call(self._pending.wait)
        return self

    def __repr__(self) -> str:
        return repr(self._pending)


class CheckpointManager:
    """Blocking :class:`anyckpt.CheckpointManager` for ordinary training loops.

    The async manager runs on an event loop in a background thread; ``save()`` returns as
    soon as the state is captured, and the write goes on while training continues::

        with anyckpt.sync.CheckpointManager("ckpts", max_to_keep=3) as manager:
            for step in range(...):
                ...
                manager.save({"w": w}, step=step)
    """

    def __init__(self, directory: Any, *args: Any, **kwargs: Any) -> None:
        self._manager = _manager.CheckpointManager(directory, *args, **kwargs)
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> CheckpointManager:
        # save_on_signal: the handlers are set here, on the caller's (main) thread, and
        # restored last on leaving; the event loop's thread cannot set them.
        control = self._manager._control
        control.enter()
        self._stack.callback(control.exit)
        portal = self._stack.enter_context(start_blocking_portal())
        try:
            self._stack.enter_context(portal.wrap_async_context_manager(self._manager))
        except BaseException:
            self._stack.close()
            raise
        self._portal = portal
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._portal = None
        if exc is None:
            self._stack.close()
        else:
            self._stack.__exit__(exc_type, exc, tb)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._portal is None:
            raise RuntimeError("use the manager inside 'with'")
        return self._portal.call(partial(fn, *args, **kwargs))

    @property
    def latest_checkpoint(self) -> str | None:
        return self._manager.latest_checkpoint

    @property
    def checkpoints(self) -> list[str]:
        """Prefixes of the committed checkpoints retention tracks, oldest first; a save still
        being written appears once it commits (call :meth:`wait` first to see it)."""
        return self._manager.checkpoints

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step

    @property
    def preemption(self) -> Any:
        """The :class:`anyckpt.preemption.PreemptionWatch` of ``save_on_signal`` (or None)."""
        return self._manager.preemption

    def save(
        self,
        state: Mapping[Any, Any],
        step: int | None = None,
        *,
        copy: bool = True,
        metrics: Mapping[str, float] | None = None,
        block: bool = True,
    ) -> PendingSave:
        """Capture ``state`` and return; the write goes on in the background."""
        pending = self._call(
            self._manager.save, state, step, copy=copy, metrics=metrics, block=block
        )
        assert self._portal is not None
        return PendingSave(pending, self._portal)

    def wait(self) -> None:
        """Block until every save so far is committed; raise the first unseen error."""
        self._call(self._manager.wait)

    def metrics(self, step: int | None = None) -> dict[str, float]:
        """Blocking :meth:`anyckpt.CheckpointManager.metrics`."""
        return dict(self._call(self._manager.metrics, step))

    def best_checkpoint(self, metric: str, mode: str = "min") -> str | None:
        """Blocking :meth:`anyckpt.CheckpointManager.best_checkpoint`."""
        best: str | None = self._call(self._manager.best_checkpoint, metric, mode)
        return best

    def restore(
        self,
        step: int | None = None,
        keys: Sequence[str] | Mapping[str, Index] | None = None,
        *,
        verify: bool = True,
        template: Any = None,
        structure: bool = False,
    ) -> Any:
        """Blocking :meth:`anyckpt.CheckpointManager.restore` (``keys`` may map names to
        the part of each to read; ``template`` gives the structure to fill; ``structure``
        rebuilds the saved one)."""
        if structure:
            return self._call(
                self._manager.restore, step, keys, verify=verify, template=template, structure=True
            )
        if template is not None:
            return self._call(self._manager.restore, step, keys, verify=verify, template=template)
        return dict(self._call(self._manager.restore, step, keys, verify=verify))


def latest_checkpoint(directory: str, **kwargs: Any) -> str | None:
    """Blocking :func:`anyckpt.latest_checkpoint`."""
    return _run(partial(_manager.latest_checkpoint, directory, **kwargs))


def get_checkpoint_state(directory: str, **kwargs: Any) -> CheckpointState | None:
    """Blocking :func:`anyckpt.get_checkpoint_state`."""
    return _run(partial(_manager.get_checkpoint_state, directory, **kwargs))

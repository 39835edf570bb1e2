"""Structured concurrency helpers shared by the formats and the manager."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

T = TypeVar("T")


def on_event_loop() -> bool:
    """Whether this thread is running an asyncio or trio event loop (blocking work here
    stalls it)."""
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
            return True
        except RuntimeError:
            pass
    return False


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def run_concurrently(calls: Iterable[Callable[[], Coroutine[Any, Any, object]]]) -> None:
    """Run the calls as tasks of one task group and wait for all of them.

    If any fails, the others are cancelled and the first error is raised as itself, not
    wrapped in an exception group, so callers can ``except OSError`` as usual. It keeps its
    own cause and context (what a client library raised it from: fsspec's ``FSTimeoutError``
    from aiohttp's timeout); the group is not chained to it. A single call is awaited as it
    is: the same result and errors without a task group (~50 µs of a small read)."""
    calls = list(calls)
    if len(calls) == 1:
        await calls[0]()
        return
    error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)
    except BaseExceptionGroup as group:
        error = first_error(group)
    if error is not None:
        # Raised outside the handler: ``raise error from None`` would set the error's own
        # ``__cause__`` to None, and raising it inside would replace its ``__context__``.
        raise error


_gc_guard = threading.Lock()
_gc_pauses = 0  # pauses under way
_gc_was_enabled = False  # whether the collector ran before the first of them


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a burst of allocations that make no
    cycles (planning and merging a save over many ranks: millions of small tuples). Each
    collection walks every live object, the ranks' manifests included: at 1,024 ranks that
    was most of the plan's time. Nested and concurrent pauses count: the collector runs
    again (if it ran before) when the last one ends."""
    global _gc_pauses, _gc_was_enabled
    with _gc_guard:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_guard:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


#: Worker threads kept for the life of the process (see :func:`run_in_worker`).
WORKERS = min(32, (os.cpu_count() or 1) + 4)
_pool: ThreadPoolExecutor | None = None
_pool_guard = threading.Lock()


def _worker_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_guard:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="anyckpt-worker")
        return _pool


def _forget_pool_after_fork() -> None:
    global _pool, _pool_guard
    _pool, _pool_guard = None, threading.Lock()  # the parent's threads are not in the child


os.register_at_fork(after_in_child=_forget_pool_after_fork)


async def run_in_worker(fn: Callable[..., T], *args: Any) -> T:
    """``await anyio.to_thread.run_sync(fn, *args)``, on threads that outlive the event loop
    under asyncio. Not abandoned on cancellation: the caller waits for ``fn`` to finish, then
    the cancellation is raised (its result dropped).

    anyio's worker threads belong to their event loop: a one-shot ``anyio.run`` (what
    ``anyckpt.sync.load`` and a benchmark's restore are) starts one and joins it at the end,
    ~0.3 ms on a small VM, as long as restoring a few small tensors takes. Trio keeps its own
    threads across runs, so there this is anyio's call."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        result = await anyio.to_thread.run_sync(fn, *args)
    else:
        # In the caller's context, as anyio.to_thread.run_sync runs it (context variables:
        # a tracing span, a request id).
        future = _worker_pool().submit(contextvars.copy_context().run, fn, *args)
        with anyio.CancelScope(shield=True):
            result = await asyncio.wrap_future(future, loop=loop)
    await anyio.lowlevel.checkpoint_if_cancelled()  # a cancellation meanwhile: raised now
    return result


def check_cancelled() -> None:
    """``anyio.from_thread.check_cancelled()`` in an anyio worker thread; nothing in any
    other thread (:func:`run_in_worker`'s, where the caller waits for the work to end)."""
    with suppress(RuntimeError):  # anyio's NoEventLoopError: not one of anyio's threads
        anyio.from_thread.check_cancelled()

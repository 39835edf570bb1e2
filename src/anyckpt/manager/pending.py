"""The saves in flight: one save (:class:`PendingSave`), what a committed one did
(:class:`SaveEvent`), and the queue that numbers, orders and finishes them (:class:`SaveQueue`,
shared by the single-process and the distributed save paths)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from ..errors import CheckpointError
from . import steps


@dataclass(frozen=True)
class SaveEvent:
    """What one save did, for progress reporting and metrics (``on_event``).

    ``blocked_seconds``: how long ``save()`` held the caller (waiting for room under
    ``max_pending``/``max_pending_bytes``, then the capture copy, ``capture_seconds``);
    ``write_seconds``: writing the files in the background; ``commit_seconds``: from written
    to committed (waiting for earlier saves, the state file, retention); ``throughput``:
    bytes per second of the background write."""

    step: int
    prefix: str
    bytes: int
    capture_seconds: float
    write_seconds: float
    commit_seconds: float
    deleted: tuple[str, ...] = ()
    preserved: tuple[str, ...] = ()
    blocked_seconds: float = 0.0
    #: Too big to copy (over ``max_pending_bytes`` or most of the available memory): written
    #: from the caller's arrays while ``save()`` waited, so ``blocked_seconds`` includes the
    #: write; committed in the background.
    staged: bool = False

    @property
    def throughput(self) -> float:
        """Bytes per second of the background write (0.0 if it took no measurable time)."""
        return self.bytes / self.write_seconds if self.write_seconds > 0 else 0.0


class PendingSave:
    """A save in flight. ``await pending`` (or :meth:`wait`) returns once it is durably
    committed and raises its error if it failed. ``skipped`` is True when
    the save policy made the manager skip it (then there is nothing to wait for); ``reason``
    says why it was written or skipped."""

    def __init__(
        self, step: int, prefix: str | None, *, skipped: bool = False, reason: str = ""
    ) -> None:
        self.step = step
        self.prefix = prefix
        self.skipped = skipped
        self.reason = reason  # why it was written or skipped (the save policy's word)
        self.event: SaveEvent | None = None
        self._done = anyio.Event()
        self._error: BaseException | None = None
        self._observed = False
        if skipped:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> PendingSave:
        await self._done.wait()
        if self._error is not None:
            self._observed = True
            raise self._error
        return self

    def __await__(self) -> Generator[Any, None, PendingSave]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "done" if self.done() else "pending"
        return f"<PendingSave step={self.step} {state}>"


class SaveQueue:
    """The manager's saves in flight, in save order: the step numbers, the slots of
    ``max_pending``, the order of commits, the task group that writes them, and the errors of
    background saves nobody has seen yet. The save paths (one process, or a coordinator's
    ranks) go through these methods only."""

    def __init__(self, max_pending: int) -> None:
        #: Saves captured and not yet committed (``max_pending``): taken before the capture.
        self.slots = anyio.Semaphore(max_pending)
        #: Held by whoever changes the directory's state (a commit, a sweep).
        self.commit_lock = anyio.Lock()
        #: The newest step saved or skipped, and the newest saved (None before the first).
        self.last_step: int | None = None
        self.last_saved_step: int | None = None
        self._pending: list[PendingSave] = []
        self._tail: anyio.Event | None = None  # done-event of the newest save
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The task group the background saves run in, for the body of ``async with``.

        The body's exception is not the task group's business: handed to it, the task group
        would cancel the captured saves and wrap the exception in an ExceptionGroup. So the
        saves finish (and commit) after an ordinary error, and the error propagates unchanged
        once they have. A cancellation or interrupt stops them instead (nothing half-written
        stays: each save removes its files)."""
        body_error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                self._task_group = group
                try:
                    yield
                except BaseException as exc:
                    body_error = exc
                    if not isinstance(exc, Exception):
                        group.cancel_scope.cancel()
        finally:
            self._task_group = None
        if body_error is not None:
            raise body_error

    def check_running(self) -> None:
        if self._task_group is None:
            raise RuntimeError("use the manager inside 'async with'")

    # -- numbering ---------------------------------------------------------------------------

    def resume(self, last_step: int | None) -> None:
        """Continue after ``last_step`` (the directory's latest checkpoint, on opening)."""
        self.last_step = self.last_saved_step = last_step

    def following(self) -> int:
        """The step of a save given none: the next after the last."""
        return steps.following(self.last_step)

    def check_order(self, step: int) -> None:
        """``ValueError`` unless ``step`` may be saved now: not negative, after the last."""
        steps.check_order(step, self.last_step)

    def skip(self, step: int, reason: str = "") -> PendingSave:
        """Record ``step`` as skipped (the save policy); a done, skipped ``PendingSave``."""
        self.last_step = step
        return PendingSave(step, None, skipped=True, reason=reason)

    # -- running saves -----------------------------------------------------------------------

    def start(
        self,
        pending: PendingSave,
        write_and_commit: Callable[[anyio.Event | None], Coroutine[Any, Any, None]],
    ) -> None:
        """Run ``write_and_commit(previous)`` in the background for ``pending``, whose slot is
        taken. ``previous`` is set when the save before it is done: commits go in save order."""
        assert self._task_group is not None, "check_running() first"
        if self.last_step is None or pending.step > self.last_step:
            self.last_step = self.last_saved_step = pending.step
        self._pending.append(pending)
        previous, self._tail = self._tail, pending._done
        self._task_group.start_soon(write_and_commit, previous)

    @staticmethod
    def finish(pending: PendingSave, error: BaseException | None) -> None:
        """Resolve ``pending`` (committed when ``error`` is None), unless already resolved.
        A cancellation resolves it as a CheckpointError the caller has seen (it propagates)."""
        if pending.done():
            return
        if error is not None and not isinstance(error, Exception):
            pending._finish(CheckpointError(f"save of step {pending.step} was cancelled"))
            pending._observed = True
            return
        pending._finish(error)

    @staticmethod
    def mark_seen(pending: PendingSave) -> None:
        """Its error was raised to the caller already (by ``save()``): not raised again."""
        pending._observed = True

    # -- errors nobody has seen --------------------------------------------------------------

    def raise_unobserved(self) -> None:
        """Raise the error of a background save nobody has seen yet (and forget the done)."""
        for pending in self._pending:
            if pending.done() and pending._error is not None and not pending._observed:
                pending._observed = True
                raise pending._error
        self._pending = [p for p in self._pending if not p.done()]

    def note_unobserved(self, exc: Exception) -> None:
        """The body failed and ``exc`` propagates: it also names the saves that failed unseen,
        so their errors are not swallowed (as notes, on Python 3.11+)."""
        for pending in self._pending:
            if pending.done() and pending._error is not None and not pending._observed:
                pending._observed = True
                if hasattr(exc, "add_note"):
                    error, step = pending._error, pending.step
                    exc.add_note(f"the background save of step {step} failed too: {error!r}")

    async def wait(self) -> None:
        """Wait until every save so far is resolved; raise the first unseen error."""
        for pending in list(self._pending):
            await pending._done.wait()
        self.raise_unobserved()

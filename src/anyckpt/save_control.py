"""What the manager consults around each save: the save policy, preemption, the budget of
bytes in flight and the stale-snapshot guard — one object, so the manager's save path calls
it at four points (marked ``# hook:`` there) and owns none of these rules.

- :meth:`SaveControl.decide` (start of ``save()``): write this step or skip it
  (:mod:`anyckpt.save_policy`; a preemption signal forces a write).
- :meth:`SaveControl.staged` (before the capture): a state whose copy would not fit — over
  ``max_pending_bytes``, or most of the memory the system has available — is not copied but
  written while the caller waits (then committed in the background).
- :meth:`SaveControl.admit` (before the capture): wait for — or with ``block=False`` refuse —
  room in ``max_pending`` and ``max_pending_bytes``.
- :meth:`SaveControl.captured` (after the capture): record the last save; digest arrays saved
  with ``copy=False`` (:mod:`anyckpt.staleness`).
- :meth:`SaveControl.written` / :meth:`SaveControl.release` (in the background write): check
  the digest before the commit; give the bytes back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import anyio
import anyio.to_thread
import numpy as np

from .errors import CheckpointError
from .preemption import PreemptionWatch
from .save_policy import (
    IntervalSeconds,
    IntervalSteps,
    LastSave,
    SaveDecision,
    SavePolicy,
    decide_save,
)
from .staleness import StaleCheck, changed_tensor, digest, stale_error

__all__ = [
    "ByteBudget",
    "SaveControl",
    "SaveTicket",
    "SaveWouldBlockError",
    "available_memory",
    "too_big_to_copy",
]

#: A copy may take at most this share of the memory the system has available; a larger state
#: is written from the caller's arrays while the caller waits (no copy, so no OOM).
AVAILABLE_SHARE = 0.8


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux's ``MemAvailable``), or
    None where it is not known."""
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def too_big_to_copy(nbytes: int) -> bool:
    """Whether a copy of ``nbytes`` would take over :data:`AVAILABLE_SHARE` of the memory the
    system has available (False where that is not known)."""
    available = available_memory()
    return available is not None and nbytes > AVAILABLE_SHARE * available


class SaveWouldBlockError(CheckpointError):
    """``save(..., block=False)`` found no room: ``max_pending`` saves, or
    ``max_pending_bytes`` of captured state, are still being written."""


class ByteBudget:
    """At most ``limit`` bytes held by captured saves not yet written. A save larger than the
    whole budget waits until nothing else is held, then goes alone (so it never deadlocks;
    the bound is then that one save)."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_pending_bytes must be a positive integer, got {limit!r}")
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._changed = anyio.Event()

    def fits(self, nbytes: int) -> bool:
        return self.held == 0 or self.held + nbytes <= self.limit

    async def acquire(self, nbytes: int, *, block: bool = True) -> None:
        while not self.fits(nbytes):
            if not block:
                raise SaveWouldBlockError(
                    f"this save would hold {nbytes} bytes while {self.held} are still being "
                    f"written (max_pending_bytes={self.limit})"
                )
            await self._changed.wait()
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        self.held -= nbytes
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


@dataclass
class SaveTicket:
    """What one admitted save holds: its bytes in the budget and its digest."""

    nbytes: int = 0
    digest: dict[str, int] | None = None
    slot: bool = False


class SaveControl:
    """The manager's save-time rules (see the module's doc). Pure configuration checks at
    construction; the signal handlers are set by :meth:`enter` (main thread)."""

    def __init__(
        self,
        *,
        save_policy: SavePolicy | None,
        checkpoint_interval: int | None,
        save_on_signal: Iterable[int] | None,
        max_pending_bytes: int | None,
        stale_check: StaleCheck | None,
        clock: Callable[[], float],
    ) -> None:
        if save_policy is not None and checkpoint_interval is not None:
            raise ValueError("pass either save_policy= or checkpoint_interval=, not both")
        if save_policy is not None and not isinstance(save_policy, SavePolicy):
            raise TypeError(f"save_policy must be an anyckpt.save_policy policy: {save_policy!r}")
        if checkpoint_interval is not None:
            save_policy = IntervalSteps(checkpoint_interval)
        self.policy = save_policy
        # The clock is read only for a policy that needs it (an injected test clock sees the
        # same calls as without a save policy).
        self._timed = save_policy is not None and any(
            isinstance(p, IntervalSeconds) for p in save_policy.parts()
        )
        self.preemption = PreemptionWatch(save_on_signal) if save_on_signal else None
        self.budget = ByteBudget(max_pending_bytes) if max_pending_bytes is not None else None
        if stale_check not in ("sample", "full", None):
            raise ValueError(f"stale_check must be 'sample', 'full' or None, got {stale_check!r}")
        self.stale_check = stale_check
        self.clock = clock
        self.last: LastSave | None = None
        self._installed_here = False

    @property
    def configured(self) -> bool:
        """Whether any rule beyond TensorFlow's ``checkpoint_interval`` is in use (a
        coordinator supports only that one yet)."""
        return (
            (self.policy is not None and not isinstance(self.policy, IntervalSteps))
            or self.preemption is not None
            or self.budget is not None
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def enter(self) -> None:
        """Install the signal handlers, on the main thread. Elsewhere (the blocking facade
        enters on its event loop's thread) they must have been installed already."""
        watch = self.preemption
        if watch is None or watch.installed:
            return
        watch.install()  # raises ValueError off the main thread
        self._installed_here = True

    def exit(self) -> None:
        """Restore the previous handlers if :meth:`enter` installed them (on the main thread:
        the blocking facade's event-loop thread leaves that to the facade)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self._installed_here and self.preemption is not None:
            self._installed_here = False
            self.preemption.restore()

    # -- one save ----------------------------------------------------------------------------

    def decide(self, step: int, last_saved_step: int | None) -> SaveDecision:
        """Write ``step`` or skip it. ``last_saved_step`` is the manager's (after a restart:
        the latest checkpoint's, with an unknown time)."""
        last = self.last
        if last is None or (last_saved_step is not None and last.step != last_saved_step):
            last = None if last_saved_step is None else LastSave(last_saved_step, None)
        watch = self.preemption
        forced = watch.signal_name if watch is not None and watch.requested else None
        now = self.clock() if self._timed else 0.0
        return decide_save(self.policy, step, now, last, forced_by=forced)

    def staged(self, tensors: Mapping[str, np.ndarray], *, copy: bool) -> bool:
        """Whether a save asked to copy ``tensors`` is instead written from them while the
        caller waits: their copy would exceed ``max_pending_bytes`` (which would otherwise
        let it go alone, over the budget) or :data:`AVAILABLE_SHARE` of the system's
        available memory."""
        if not copy:
            return False
        nbytes = sum(int(a.nbytes) for a in tensors.values())
        if self.budget is not None and nbytes > self.budget.limit:
            return True
        return too_big_to_copy(nbytes)

    async def admit(
        self, slots: anyio.Semaphore, tensors: Mapping[str, np.ndarray], *, copy: bool, block: bool
    ) -> SaveTicket:
        """Take a slot of ``max_pending`` and the bytes the capture will hold (only copies
        hold bytes: ``copy=False`` holds the caller's arrays); wait, or raise
        :class:`SaveWouldBlockError` with ``block=False``."""
        ticket = SaveTicket()
        if block:
            await slots.acquire()
        else:
            try:
                slots.acquire_nowait()
            except anyio.WouldBlock:
                raise SaveWouldBlockError(
                    "the earlier saves (max_pending of them) are still being written"
                ) from None
        ticket.slot = True
        if self.budget is not None and copy:
            nbytes = sum(int(a.nbytes) for a in tensors.values())
            try:
                await self.budget.acquire(nbytes, block=block)
            except BaseException:
                slots.release()
                ticket.slot = False
                raise
            ticket.nbytes = nbytes
        return ticket

    async def captured(
        self, ticket: SaveTicket, step: int, tensors: Mapping[str, np.ndarray], *, copy: bool
    ) -> None:
        """The save was taken: remember it (and consume a preemption request); digest the
        caller's arrays when they were not copied."""
        self.last = LastSave(step, self.clock() if self._timed else None)
        if self.preemption is not None:
            self.preemption.consume()
        if not copy and self.stale_check is not None:
            mode = self.stale_check
            if mode == "full":
                ticket.digest = await anyio.to_thread.run_sync(digest, tensors, mode)
            else:
                ticket.digest = digest(tensors, mode)

    async def written(
        self, ticket: SaveTicket, step: int, prefix: str, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """After the checkpoint's files are written, before its commit: raise
        :class:`~anyckpt.staleness.StaleSnapshotError` if an uncopied array changed."""
        if ticket.digest is None or self.stale_check is None:
            return
        mode = self.stale_check
        changed = await anyio.to_thread.run_sync(changed_tensor, tensors, ticket.digest, mode)
        if changed is not None:
            raise stale_error(changed, step, prefix)

    def release(self, ticket: SaveTicket) -> None:
        """Give back what :meth:`admit` took (the slot is the manager's to release)."""
        if self.budget is not None and ticket.nbytes:
            self.budget.release(ticket.nbytes)
            ticket.nbytes = 0

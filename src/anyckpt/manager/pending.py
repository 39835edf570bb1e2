"""A save in flight (:class:`PendingSave`) and what a committed one did (:class:`SaveEvent`)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ..save_control import SaveTicket


@dataclass(frozen=True)
class SaveEvent:
    """What one save did, for progress reporting and metrics (``on_event``)."""

    step: int
    prefix: str
    bytes: int
    capture_seconds: float
    write_seconds: float
    commit_seconds: float
    deleted: tuple[str, ...] = ()
    preserved: tuple[str, ...] = ()


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
        self._ticket = SaveTicket()  # budget bytes and the stale-snapshot digest
        self._tree: Any = None  # the structure's description, for the sidecar
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

"""A save in flight (:class:`PendingSave`) and what a committed one did (:class:`SaveEvent`)."""

from __future__ import annotations

import numbers
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import numpy as np

if TYPE_CHECKING:
    pass


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


def check_step(step: object) -> int:
    """``step`` as an ``int``: a Python or NumPy integer; ``TypeError`` for anything else
    (a float such as ``200.9``, a string such as ``"7"``, a bool), which ``int()`` would
    silently turn into another checkpoint's number."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}")
    return int(step)


class PendingSave:
    """A save in flight. ``await pending`` (or :meth:`wait`) returns once it is durably
    committed and raises its error if it failed. ``skipped`` is True when
    ``checkpoint_interval`` made the manager skip it (then there is nothing to wait for)."""

    def __init__(self, step: int, prefix: str | None, *, skipped: bool = False) -> None:
        self.step = step
        self.prefix = prefix
        self.skipped = skipped
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

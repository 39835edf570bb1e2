"""Preemption: turn a signal (a cloud VM's SIGTERM before it is reclaimed) into "save now".

:class:`PreemptionWatch` installs a handler for the given signals that only records the
signal. The manager (``CheckpointManager(..., save_on_signal=(signal.SIGTERM,))``) then writes
the next ``save()`` whatever its save policy says, and the training loop, seeing
``manager.preemption.should_stop`` after a save, leaves its ``async with``/``with`` block,
which waits until that save is committed. The handler raises nothing into the training
step, so no state is left half-updated; the process exits when the loop does, inside the
grace period if a save fits in it. A second signal during the save is recorded too (it does
not kill the process: SIGKILL at the end of the grace period does).

Signal handlers can only be set on the main thread (Python's rule): :meth:`install` raises
``ValueError`` elsewhere, and :meth:`restore` puts the previous handlers back. The handlers
it replaces are not called (the default SIGTERM handler would kill the process before the
save).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["PreemptionWatch"]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionWatch:
    """Records the arrival of ``signals`` (numbers or ``signal.Signals``) while installed.

    ``requested`` is true from the first signal until :meth:`consume` (the manager consumes
    it when the forced save is taken); ``received`` keeps the last signal number;
    ``should_stop`` tells the training loop to leave after its save.
    """

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        if not self.signals:
            raise ValueError("save_on_signal needs at least one signal")
        self._event = threading.Event()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        """A signal came and its forced save was not taken yet."""
        return self._event.is_set()

    @property
    def should_stop(self) -> bool:
        """A signal came and the save it forced has been taken: leave the training loop (the
        manager's exit waits for that save to commit). Tested right after ``save()``, it
        never misses a signal that came during the save: that one forces the next save."""
        return self.received is not None and not self._event.is_set()

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else _signal_name(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._event.set()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` had arrived (for a trainer that learns of preemption another
        way, e.g. a cloud metadata endpoint)."""
        self._handle(signum, None)

    def consume(self) -> str | None:
        """Clear the request; return the name of the signal that made it (None if none)."""
        if not self._event.is_set():
            return None
        self._event.clear()
        return self.signal_name

    def install(self) -> None:
        """Set the handlers (main thread only; twice is once)."""
        if self.installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "save_on_signal: signal handlers can only be installed on the main thread; "
                "enter the manager there (or call PreemptionWatch.request() yourself)"
            )
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install` (main thread)."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> PreemptionWatch:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

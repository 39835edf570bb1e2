"""The coordination interface the manager needs from a distributed engine, and its
single-process default.

Everything a multi-process save exchanges goes through four calls on small, picklable objects
(tensor names, shapes, index entries, the outcome): ``all_gather``, ``gather``, ``broadcast``
and ``barrier``, plus ``scatter`` where the engine has one (:func:`scatter`). Tensor bytes
never do: every process writes its own files to shared storage.

The calls are blocking (the manager runs them in a worker thread) and collective: every rank
makes the same calls in the same order. Each one gives up after the coordinator's ``timeout``
and raises :class:`CoordinationError`; a peer that died makes them fail at once. After a
failed call the group is out of step, so an implementation refuses every later call too
(``broken``): a rank never waits on a collective its peers have abandoned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..errors import CheckpointError

T = TypeVar("T")

#: Default seconds a collective waits for the slowest rank. A save's second collective waits
#: for every rank to finish writing its shards, so this must exceed the longest write.
DEFAULT_TIMEOUT = 1800.0


class CoordinationError(CheckpointError):
    """A collective failed: a peer died, timed out, or an earlier collective already failed.

    The outcome of the save it belongs to may be unknown to this rank; the state file tells
    (the primary rank commits a save only after hearing from every rank)."""


@runtime_checkable
class Coordinator(Protocol):
    """What :class:`~anyckpt.CheckpointManager` needs from a distributed engine.

    ``rank`` 0 is the primary: it merges the index, writes the state file and applies
    retention. Objects must be picklable; they are small (metadata, never tensor bytes)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def timeout(self) -> float:
        """Seconds a collective waits before raising :class:`CoordinationError`."""
        ...

    def barrier(self) -> None:
        """Return once every rank has called it."""
        ...

    def broadcast(self, obj: T | None, src: int = 0) -> T:
        """``src`` passes its object, the others None; every rank returns ``src``'s object."""
        ...

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's object, indexed by rank, on every rank."""
        ...

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's object, indexed by rank, on ``dst``; None on the others."""
        ...


class SingleProcessCoordinator:
    """One process, world size 1: every collective returns at once."""

    rank = 0
    world_size = 1
    timeout = DEFAULT_TIMEOUT

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: T | None, src: int = 0) -> T:
        check_rank(src, 1)
        assert obj is not None, "the source rank passes an object"
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        check_rank(dst, 1)
        return [obj]

    def scatter(self, objs: Sequence[T] | None, src: int = 0) -> T:
        check_rank(src, 1)
        assert objs is not None, "the source rank passes one object per rank"
        assert len(objs) == 1, "the source rank passes one object per rank"
        return objs[0]

    def __repr__(self) -> str:
        return "SingleProcessCoordinator()"


def scatter(coordinator: Coordinator, objs: Sequence[T] | None, src: int = 0) -> T:
    """``src`` passes one object per rank (the others None); each rank returns its own.

    Uses the coordinator's ``scatter(objs, src)`` where it has one (the built-in coordinators
    do): each rank then receives only its object. A coordinator without one still works: the
    whole list is broadcast and each rank keeps its own, which moves world-size times more
    bytes (fine for small groups)."""
    own = getattr(coordinator, "scatter", None)
    if own is not None:
        result: T = own(objs, src)
        return result
    everyone: list[T] = coordinator.broadcast(None if objs is None else list(objs), src)
    return everyone[coordinator.rank]


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")

"""The coordinator on ``torch.distributed``: object collectives on a gloo group of its own."""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .base import DEFAULT_TIMEOUT, CoordinationError, check_rank

T = TypeVar("T")
R = TypeVar("R")


class TorchCoordinator:
    """Coordinates a save over an initialised ``torch.distributed`` process group.

    By default it makes a gloo group of its own over every rank (collectively: all ranks must
    construct their coordinator, in the same order relative to other groups), with ``timeout``
    seconds per collective. Its control messages then travel on CPU whatever backend the
    training uses (NCCL's object collectives would need a GPU tensor per message), and a slow
    save never holds up the training's own group. Pass ``group`` to use an existing group;
    its own timeout then applies and ``timeout`` is only reported.

    Rank and world size are those of the group. Calls are serialised: a collective is made by
    one thread at a time (the manager makes them in save order).
    """

    def __init__(self, group: Any = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group() first"
            )
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._dist = dist
        self._timeout = float(timeout)
        owns = group is None
        if group is None:
            group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self._timeout)
            )
        self._group = group
        self._owns_group = owns
        self._rank = int(dist.get_rank(group))
        self._world_size = int(dist.get_world_size(group))
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self._world_size)]
        self._lock = threading.Lock()
        self._broken: str | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def broken(self) -> str | None:
        """Why the group is out of step (a collective failed), or None."""
        return self._broken

    def _collective(self, what: str, call: Callable[[], R]) -> R:
        with self._lock:
            if self._broken is not None:
                raise CoordinationError(
                    f"{what} refused: an earlier collective failed ({self._broken})"
                )
            try:
                return call()
            except Exception as exc:
                self._broken = f"{what} on rank {self._rank}: {exc}"
                self._abandon()
                raise CoordinationError(
                    f"{what} failed on rank {self._rank} of {self._world_size} "
                    f"(timeout {self._timeout:g} s): {exc}"
                ) from exc

    def _abandon(self) -> None:
        """Close our group's connections, so peers still waiting on it fail now, not at their
        timeout (a peer blocked on this rank would otherwise wait out its whole timeout)."""
        if not self._owns_group:
            return
        with contextlib.suppress(Exception):
            self._dist.destroy_process_group(self._group)

    def barrier(self) -> None:
        self._collective("barrier", lambda: self._dist.barrier(group=self._group))

    def broadcast(self, obj: T | None, src: int = 0) -> T:
        check_rank(src, self._world_size)
        box: list[Any] = [obj if self._rank == src else None]
        global_src = self._global_ranks[src]

        def call() -> T:
            self._dist.broadcast_object_list(box, src=global_src, group=self._group)
            result: T = box[0]
            return result

        return self._collective("broadcast", call)

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self._world_size

        def call() -> list[Any]:
            self._dist.all_gather_object(out, obj, group=self._group)
            return out

        return self._collective("all_gather", call)

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        check_rank(dst, self._world_size)
        out: list[Any] | None = [None] * self._world_size if self._rank == dst else None
        global_dst = self._global_ranks[dst]

        def call() -> list[Any] | None:
            self._dist.gather_object(obj, out, dst=global_dst, group=self._group)
            return out

        return self._collective("gather", call)

    def scatter(self, objs: Sequence[T] | None, src: int = 0) -> T:
        """``src`` passes one object per rank; each rank receives only its own."""
        check_rank(src, self._world_size)
        box: list[Any] = [None]
        global_src = self._global_ranks[src]
        inputs = list(objs) if self._rank == src and objs is not None else None

        def call() -> T:
            self._dist.scatter_object_list(box, inputs, src=global_src, group=self._group)
            result: T = box[0]
            return result

        return self._collective("scatter", call)

    def __repr__(self) -> str:
        return (
            f"TorchCoordinator(rank={self._rank}, world_size={self._world_size}, "
            f"timeout={self._timeout:g})"
        )

"""The coordinator on ``jax.distributed``: the coordination service's key-value store.

JAX has no object collectives across processes, but every process of a multi-process JAX job
(``jax.distributed.initialize()``) talks to one coordination service, whose key-value store
and barriers are what Orbax coordinates its saves with. Each collective here is a few keys:
every rank sets its own under a fresh name, reads the ones it needs (waiting at most
``timeout``), meets the others at a barrier, then deletes its own.
"""

from __future__ import annotations

import importlib
import pickle
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .base import DEFAULT_TIMEOUT, CoordinationError, check_rank

T = TypeVar("T")
R = TypeVar("R")


class KeyValueClient(Protocol):
    """The part of JAX's ``DistributedRuntimeClient`` used here."""

    def key_value_set_bytes(self, key: str, value: bytes) -> None: ...
    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes: ...
    def key_value_delete(self, key: str) -> None: ...
    def wait_at_barrier(self, barrier_id: str, timeout_in_ms: int) -> None: ...


class JaxCoordinator:
    """Coordinates a save over the processes of a ``jax.distributed`` job.

    Call ``jax.distributed.initialize()`` first; rank and world size are
    ``jax.process_index()`` and ``jax.process_count()``. ``namespace`` prefixes every key:
    two coordinators used at once need different ones. (``client``, ``rank`` and
    ``world_size`` are for tests: another object with the same four methods.)
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        namespace: str = "anyckpt",
        client: KeyValueClient | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if client is None:
            jax = importlib.import_module("jax")
            distributed = importlib.import_module("jax._src.distributed")
            client = distributed.global_state.client
            if client is None:
                raise RuntimeError(
                    "jax.distributed is not initialised: call jax.distributed.initialize() first"
                )
            rank, world_size = jax.process_index(), jax.process_count()
        if rank is None or world_size is None:
            raise ValueError("rank and world_size go with client")
        check_rank(rank, world_size)
        self._client = client
        self._rank = int(rank)
        self._world_size = int(world_size)
        self._timeout = float(timeout)
        self._namespace = namespace
        self._sequence = 0
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
        """Why the ranks are out of step (a collective failed), or None."""
        return self._broken

    def _ms(self) -> int:
        return max(1, int(self._timeout * 1000))

    def _collective(self, what: str, call: Callable[[str], R]) -> R:
        with self._lock:
            if self._broken is not None:
                raise CoordinationError(
                    f"{what} refused: an earlier collective failed ({self._broken})"
                )
            self._sequence += 1
            base = f"{self._namespace}/{self._sequence}/{what}"
            try:
                return call(base)
            except Exception as exc:
                self._broken = f"{what} on rank {self._rank}: {exc}"
                raise CoordinationError(
                    f"{what} failed on rank {self._rank} of {self._world_size} "
                    f"(timeout {self._timeout:g} s): {exc}"
                ) from exc

    def _put(self, base: str, obj: Any) -> str:
        key = f"{base}/{self._rank}"
        self._client.key_value_set_bytes(key, pickle.dumps(obj))
        return key

    def _get(self, base: str, rank: int) -> Any:
        return pickle.loads(self._client.blocking_key_value_get_bytes(f"{base}/{rank}", self._ms()))

    def _done(self, base: str, keys: list[str]) -> None:
        """Every rank has read what it needs: then each deletes its own keys."""
        self._client.wait_at_barrier(f"{base}/done", self._ms())
        for key in keys:
            self._client.key_value_delete(key)

    def barrier(self) -> None:
        self._collective("barrier", lambda base: self._client.wait_at_barrier(base, self._ms()))

    def broadcast(self, obj: T | None, src: int = 0) -> T:
        check_rank(src, self._world_size)

        def call(base: str) -> T:
            mine = [self._put(base, obj)] if self._rank == src else []
            result: T = obj if self._rank == src else self._get(base, src)  # type: ignore[assignment]
            self._done(base, mine)
            return result

        return self._collective("broadcast", call)

    def all_gather(self, obj: Any) -> list[Any]:
        def call(base: str) -> list[Any]:
            mine = [self._put(base, obj)]
            out = [obj if r == self._rank else self._get(base, r) for r in range(self._world_size)]
            self._done(base, mine)
            return out

        return self._collective("all_gather", call)

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        check_rank(dst, self._world_size)

        def call(base: str) -> list[Any] | None:
            mine = [self._put(base, obj)] if self._rank != dst else []
            out = None
            if self._rank == dst:
                out = [
                    obj if r == self._rank else self._get(base, r) for r in range(self._world_size)
                ]
            self._done(base, mine)
            return out

        return self._collective("gather", call)

    def scatter(self, objs: Sequence[T] | None, src: int = 0) -> T:
        """``src`` passes one object per rank; each rank reads only its own key."""
        check_rank(src, self._world_size)

        def call(base: str) -> T:
            mine: list[str] = []
            if self._rank == src:
                assert objs is not None
                assert len(objs) == self._world_size
                for r, obj in enumerate(objs):
                    key = f"{base}/to/{r}"
                    self._client.key_value_set_bytes(key, pickle.dumps(obj))
                    mine.append(key)
            result: T = pickle.loads(
                self._client.blocking_key_value_get_bytes(f"{base}/to/{self._rank}", self._ms())
            )
            self._done(base, mine)
            return result

        return self._collective("scatter", call)

    def __repr__(self) -> str:
        return (
            f"JaxCoordinator(rank={self._rank}, world_size={self._world_size}, "
            f"timeout={self._timeout:g})"
        )

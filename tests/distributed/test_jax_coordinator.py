"""JaxCoordinator over an in-memory stand-in for JAX's coordination service (the four client
calls it uses), with threads as ranks: its collectives, its timeouts, and whole multi-rank
saves through the manager in one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from states import global_state, rank_state

import anyckpt
from anyckpt.distributed import CoordinationError, Coordinator, JaxCoordinator
from anyckpt.distributed.base import scatter


class FakeService:
    """The coordination service's key-value store and named barriers, in memory. Like JAX's,
    a get waits for its key, a barrier for every process, each up to a timeout (then
    DEADLINE_EXCEEDED)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.store: dict[str, bytes] = {}
        self.barriers: dict[str, int] = {}
        self.cond = threading.Condition()

    def client(self) -> FakeClient:
        return FakeClient(self)


class FakeClient:
    def __init__(self, service: FakeService) -> None:
        self.service = service

    def key_value_set_bytes(self, key: str, value: bytes) -> None:
        with self.service.cond:
            if key in self.service.store:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.service.store[key] = value
            self.service.cond.notify_all()

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        with self.service.cond:
            if not self.service.cond.wait_for(
                lambda: key in self.service.store, timeout_in_ms / 1000
            ):
                raise RuntimeError(f"DEADLINE_EXCEEDED: key {key}")
            return self.service.store[key]

    def key_value_delete(self, key: str) -> None:
        with self.service.cond:
            self.service.store.pop(key, None)

    def wait_at_barrier(self, barrier_id: str, timeout_in_ms: int) -> None:
        with self.service.cond:
            self.service.barriers[barrier_id] = self.service.barriers.get(barrier_id, 0) + 1
            self.service.cond.notify_all()
            if not self.service.cond.wait_for(
                lambda: self.service.barriers[barrier_id] >= self.service.world_size,
                timeout_in_ms / 1000,
            ):
                raise RuntimeError(f"DEADLINE_EXCEEDED: barrier {barrier_id}")


def run_ranks(
    world_size: int, body: Callable[[JaxCoordinator], Any], *, timeout: float = 10.0
) -> tuple[list[Any], FakeService]:
    """Run ``body`` on ``world_size`` threads, one coordinator each; their results (or the
    exceptions they raised), by rank."""
    service = FakeService(world_size)
    results: list[Any] = [None] * world_size

    def rank_main(rank: int) -> None:
        coordinator = JaxCoordinator(
            client=service.client(), rank=rank, world_size=world_size, timeout=timeout
        )
        try:
            results[rank] = body(coordinator)
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a rank hangs"
    return results, service


def test_collectives() -> None:
    def body(c: JaxCoordinator) -> Any:
        assert isinstance(c, Coordinator)
        gathered = c.all_gather({"rank": c.rank})
        at_two = c.gather(c.rank * 10, dst=2)
        c.barrier()
        told = c.broadcast(f"from {c.rank}" if c.rank == 1 else None, src=1)
        return gathered, at_two, told

    results, service = run_ranks(3, body)
    for rank, (gathered, at_two, told) in enumerate(results):
        assert gathered == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        assert at_two == ([0, 10, 20] if rank == 2 else None)
        assert told == "from 1"
    assert service.store == {}  # every rank deleted its keys once all had read them


def test_scatter_gives_each_rank_only_its_own_object() -> None:
    reads: list[str] = []

    def body(c: JaxCoordinator) -> Any:
        inner = c._client
        get = inner.blocking_key_value_get_bytes

        def recording_get(key: str, timeout_in_ms: int) -> bytes:
            reads.append(key)
            return get(key, timeout_in_ms)

        inner.blocking_key_value_get_bytes = recording_get  # type: ignore[method-assign]
        objs = [f"for {r}" for r in range(c.world_size)] if c.rank == 1 else None
        return scatter(c, objs, src=1)

    results, service = run_ranks(3, body)
    assert results == ["for 0", "for 1", "for 2"]
    assert len(reads) == 3
    assert sorted(key[-1] for key in reads) == ["0", "1", "2"]  # one read each, its own
    assert service.store == {}


def test_a_rank_that_does_not_take_part_times_the_others_out() -> None:
    def body(c: JaxCoordinator) -> Any:
        if c.rank == 1:
            return "idle"
        started = time.monotonic()
        try:
            c.all_gather(c.rank)
        except CoordinationError as exc:
            first = (str(exc), time.monotonic() - started)
        with pytest.raises(CoordinationError, match="earlier collective failed"):
            c.barrier()  # out of step now: refused at once
        return first, c.broken

    results, _ = run_ranks(2, body, timeout=0.5)
    (message, seconds), broken = results[0]
    assert "DEADLINE_EXCEEDED" in message
    assert 0.4 < seconds < 5
    assert broken is not None
    assert results[1] == "idle"


def test_manager_saves_on_four_ranks_through_the_key_value_store(tmp_path: Path) -> None:
    """The whole protocol (plan, writes, merged index, commit, outcome) with JaxCoordinator:
    four ranks, each a thread with its own event loop and manager."""

    def body(c: JaxCoordinator) -> Any:
        async def main() -> Any:
            async with anyckpt.CheckpointManager(tmp_path, max_to_keep=1, coordinator=c) as m:
                for step in (1, 2):
                    await (await m.save(rank_state(c.rank, c.world_size, step), step=step))
                return m.checkpoints

        return anyio.run(main)

    results, service = run_ranks(4, body)
    assert results == [[f"{tmp_path}/ckpt-2"]] * 4
    assert service.store == {}
    loaded = anyckpt.sync.load(tmp_path / "ckpt-2")
    expected = global_state(4, 2)
    assert sorted(loaded) == sorted(expected)
    for key, want in expected.items():
        if want.dtype == object:
            assert loaded[key].tolist() == want.tolist()
        else:
            np.testing.assert_array_equal(loaded[key], want)
    assert not list(tmp_path.glob("ckpt-1*"))  # retention, applied by rank 0

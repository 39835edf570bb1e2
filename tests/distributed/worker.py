"""One rank of a multi-process test: ``python worker.py SCENARIO ARGS_JSON`` (see launch.py).

Every scenario runs in a real process of a real torch.distributed group (gloo on CPU) and
returns what it saw as JSON (and arrays); the tests assert on that.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch.distributed as dist
from states import rank_state

import anyckpt
import anyckpt.manager.distributed as dsave
from anyckpt.distributed import TorchCoordinator, even_slice
from anyckpt.storage import Storage

Scenario = Callable[[TorchCoordinator, dict[str, Any]], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def manager(coordinator: TorchCoordinator, args: dict[str, Any]) -> anyckpt.CheckpointManager:
    return anyckpt.CheckpointManager(
        args["url"],
        max_to_keep=args.get("max_to_keep", 5),
        storage_options=args.get("storage_options"),
        format_options=args.get("format_options"),
        coordinator=coordinator,
    )


def error_info(exc: BaseException, started: float) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "seconds": time.monotonic() - started,
    }


async def latest(args: dict[str, Any]) -> str | None:
    prefix = await anyckpt.latest_checkpoint(
        args["url"], storage_options=args.get("storage_options")
    )
    return prefix.rsplit("/", 1)[-1] if prefix else None


@scenario
async def save(coordinator: TorchCoordinator, args: dict[str, Any]) -> dict[str, Any]:
    """Save ``steps``; report each save's event and the manager's view. With
    ``sweep_max_to_keep``, then reopen with that and sweep."""
    rank, world = coordinator.rank, coordinator.world_size
    deleted, written = [], []
    async with manager(coordinator, args) as m:
        for step in args["steps"]:
            pending = await m.save(rank_state(rank, world, step), step=step)
            await pending
            assert pending.event is not None
            deleted.append(list(pending.event.deleted))
            written.append(pending.event.bytes)
        result = {
            "events_deleted": deleted,
            "events_bytes": written,
            "latest": m.latest_checkpoint,
            "checkpoints": m.checkpoints,
        }
    if "sweep_max_to_keep" in args:
        async with manager(coordinator, {**args, "max_to_keep": args["sweep_max_to_keep"]}) as m:
            swept, _ = await m.sweep()
            result.update(swept=list(swept), checkpoints=m.checkpoints)
    return result


class CountingReader:
    """A data-file reader that counts the bytes read through it."""

    def __init__(self, inner: Any, counts: dict[str, int]) -> None:
        self._inner = inner
        self._counts = counts
        self.path = inner.path
        self.size = inner.size

    def read(self, offset: int, length: int) -> bytes:
        self._counts["bytes"] += length
        return bytes(self._inner.read(offset, length))

    def read_into(self, offset: int, buffer: Any) -> None:
        self._counts["bytes"] += memoryview(buffer).nbytes
        self._inner.read_into(offset, buffer)

    def read_ranges_into(self, requests: Any) -> None:
        self._counts["bytes"] += sum(memoryview(buffer).nbytes for _, buffer in requests)
        self._inner.read_ranges_into(requests)

    def close(self) -> None:
        self._inner.close()


@scenario
async def restore(coordinator: TorchCoordinator, args: dict[str, Any]) -> dict[str, Any]:
    """Each rank restores its own rows of the sharded tensors (an even split over *this*
    world size) and all of a replicated one; reports the data bytes it read."""
    rank, world = coordinator.rank, coordinator.world_size
    counts = {"bytes": 0}
    open_reader = Storage.open_reader

    def counting(self: Storage, path: str) -> Any:
        reader = open_reader(self, path)
        return CountingReader(reader, counts) if ".data-" in path else reader

    Storage.open_reader = counting  # type: ignore[method-assign]
    wanted = {
        "model/emb": even_slice(10, rank, world),
        "model/table": even_slice(6, rank, world),
        "model/cols": even_slice(4, rank, world),
        "model/bias": None,
    }
    async with manager(coordinator, args) as m:
        arrays = await m.restore(args.get("step"), wanted)
    return {
        "bytes_read": counts["bytes"],
        "slices": {k: None if v is None else [v.start, v.stop] for k, v in wanted.items()},
        "arrays": arrays,
    }


@scenario
async def faults(coordinator: TorchCoordinator, args: dict[str, Any]) -> dict[str, Any]:
    """Step 1 commits; step 2 fails writing on rank ``bad``; step 3 has ranks disagree on a
    tensor's shape; step 4 commits again (the group is still usable)."""
    rank, world = coordinator.rank, coordinator.world_size
    bad = args["bad"]
    outcomes: dict[str, Any] = {}
    real_write = dsave.write_data_file

    def failing_write(*a: Any) -> Any:
        raise OSError(28, "No space left on device (injected)")

    async with manager(coordinator, args) as m:
        for step in (1, 2, 3, 4):
            state = rank_state(rank, world, step)
            if step == 2 and rank == bad:
                dsave.write_data_file = failing_write  # type: ignore[assignment]
            if step == 3:
                state["model"]["bias"] = np.zeros(7 + (rank == bad), dtype=np.float32)
            started = time.monotonic()
            try:
                pending = await m.save(state, step=step)
                await pending
                outcomes[str(step)] = {"ok": True}
            except Exception as exc:
                outcomes[str(step)] = error_info(exc, started)
            finally:
                dsave.write_data_file = real_write  # type: ignore[assignment]
            outcomes[str(step)]["latest"] = await latest(args)
            outcomes[str(step)]["files"] = sorted(
                n for n in os.listdir(args["url"]) if n.startswith(f"ckpt-{step}")
            )
    return outcomes


@scenario
async def kill(coordinator: TorchCoordinator, args: dict[str, Any]) -> dict[str, Any]:
    """Step 1 commits; in step 2 rank ``victim`` is killed (SIGKILL) in the middle of writing
    its data file. The survivors report the error they got and how long it took."""
    rank, world = coordinator.rank, coordinator.world_size
    victim = args["victim"]

    def dying_write(storage: Storage, path: str, *rest: Any) -> Any:
        writer = storage.open_writer(path)
        writer.write(b"\0" * 4096)  # half a file, never committed
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    result: dict[str, Any] = {}
    async with manager(coordinator, args) as m:
        await (await m.save(rank_state(rank, world, 1), step=1))
        if rank == victim:
            dsave.write_data_file = dying_write  # type: ignore[assignment]
        started = time.monotonic()
        try:
            await (await m.save(rank_state(rank, world, 2), step=2))
            result["step2"] = {"ok": True}
        except Exception as exc:
            result["step2"] = error_info(exc, started)
        # A save after a dead peer fails at once too: never a hang.
        started = time.monotonic()
        try:
            await (await m.save(rank_state(rank, world, 3), step=3))
            result["step3"] = {"ok": True}
        except Exception as exc:
            result["step3"] = error_info(exc, started)
        result["latest"] = await latest(args)
        # Stay alive a while: the peers must not depend on this process exiting.
        await anyio.sleep(args.get("linger", 0))
    return result


@scenario
async def hang(coordinator: TorchCoordinator, args: dict[str, Any]) -> dict[str, Any]:
    """Step 1 commits; then rank ``idle`` stops taking part (alive, not saving) for a while.
    The others must time out instead of waiting for it."""
    rank, world = coordinator.rank, coordinator.world_size
    result: dict[str, Any] = {}
    async with manager(coordinator, args) as m:
        await (await m.save(rank_state(rank, world, 1), step=1))
        if rank == args["idle"]:
            await anyio.sleep(args["idle_seconds"])
            return {"idle": True}
        for step in (2, 3):
            started = time.monotonic()
            try:
                await (await m.save(rank_state(rank, world, step), step=step))
                result[str(step)] = {"ok": True}
            except Exception as exc:
                result[str(step)] = error_info(exc, started)
        result["latest"] = await latest(args)
    return result


def main() -> None:
    name, args = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(os.environ["ANYCKPT_TEST_OUT"])
    dist.init_process_group(
        "gloo",
        init_method=os.environ["ANYCKPT_TEST_RDZV"],
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    coordinator = TorchCoordinator(timeout=args.get("timeout", 30.0))
    try:
        result = anyio.run(SCENARIOS[name], coordinator, args)
    except BaseException:
        traceback.print_exc()
        raise
    arrays = result.pop("arrays", None)
    if arrays is not None:
        np.savez(out / f"rank{rank}.npz", **arrays)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # No destroy_process_group: after a failed collective it could wait on dead peers.
    os._exit(0)


if __name__ == "__main__":
    main()

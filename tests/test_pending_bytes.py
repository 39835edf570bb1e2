"""``max_pending_bytes`` (issue 16): back-pressure by the bytes of captured copies not yet
written. ``save()`` waits for room, or with ``block=False`` raises SaveWouldBlockError; the
peak RSS of a process saving 64 MiB states to a slow storage stays within the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from sink_fs import Slowness

import anyckpt
from anyckpt.save_control import ByteBudget, SaveWouldBlockError

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    Slowness.gate = event = threading.Event()
    Slowness.entered = threading.Semaphore(0)
    try:
        yield event
    finally:
        event.set()
        Slowness.gate = None


def directory() -> str:
    return f"sinkmem://budget-{uuid.uuid4().hex}"


def test_block_false_raises_when_the_bytes_would_exceed_the_budget(gate: threading.Event) -> None:
    with anyckpt.sync.CheckpointManager(
        directory(), max_pending=4, max_pending_bytes=1000
    ) as manager:
        first = manager.save({"w": np.zeros(150, np.float32)}, step=1)  # 600 bytes held
        Slowness.entered.acquire()  # its write is at the gate
        with pytest.raises(SaveWouldBlockError, match=r"600 are still being written"):
            manager.save({"w": np.zeros(150, np.float32)}, step=2, block=False)
        # Under the budget, it goes (400 + 600 <= 1000).
        second = manager.save({"w": np.zeros(100, np.float32)}, step=3, block=False)
        # copy=False holds no copy: no bytes counted.
        third = manager.save({"w": np.zeros(1000, np.float32)}, step=4, copy=False, block=False)
        assert not any(p.done() for p in (first, second, third))
        gate.set()
        manager.wait()
        assert manager.latest_step == 4


def test_block_false_raises_when_max_pending_saves_are_in_flight(gate: threading.Event) -> None:
    with anyckpt.sync.CheckpointManager(directory(), max_pending=1) as manager:
        manager.save({"w": np.zeros(4)}, step=1)
        Slowness.entered.acquire()
        with pytest.raises(SaveWouldBlockError, match="max_pending"):
            manager.save({"w": np.zeros(4)}, step=2, block=False)
        gate.set()
    assert issubclass(SaveWouldBlockError, anyckpt.CheckpointError)


@pytest.mark.anyio
async def test_save_waits_for_room_then_goes(gate: threading.Event) -> None:
    async with anyckpt.CheckpointManager(
        directory(), max_pending=4, max_pending_bytes=1000, max_to_keep=None
    ) as manager:
        await manager.save({"w": np.zeros(200, np.float32)}, step=1)  # 800 bytes
        await anyio.to_thread.run_sync(Slowness.entered.acquire)
        returned = []

        async def second() -> None:
            returned.append(await manager.save({"w": np.zeros(200, np.float32)}, step=2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            assert returned == []  # waiting for room: 800 + 800 > 1000
            gate.set()
        assert returned[0].step == 2
        await manager.wait()
        assert manager.checkpoints[-1].endswith("ckpt-2")


@pytest.mark.anyio
async def test_budget_admits_one_save_larger_than_itself_alone() -> None:
    budget = ByteBudget(100)
    await budget.acquire(500)  # nothing else held: it goes alone
    with pytest.raises(SaveWouldBlockError):
        await budget.acquire(1, block=False)
    budget.release(500)
    await budget.acquire(60)
    await budget.acquire(40)
    assert budget.held == budget.limit == 100
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)


CHILD = textwrap.dedent(
    """
    import json, sys, uuid
    import numpy as np
    import anyckpt
    from sink_fs import Slowness

    budget = None if sys.argv[1] == "none" else int(sys.argv[1])
    Slowness.seconds = 0.3

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    state = {"w": np.ones(64 * 2**20 // 4, np.float32)}
    with anyckpt.sync.CheckpointManager(
        f"sinkmem://rss-{uuid.uuid4().hex}", max_to_keep=1, max_pending=8, max_pending_bytes=budget
    ) as manager:
        manager.save({"w": np.ones(4, np.float32)}, step=1).wait()  # warm up the code paths
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from here
        baseline = rss("VmRSS")
        for step in range(2, 8):
            state["w"][0] = step
            manager.save(state, step=step)
        manager.wait()
        peak = rss("VmHWM")
    print(json.dumps({"baseline": baseline, "peak": peak}))
    """
)


def peak_over_baseline(budget: int | None) -> int:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), *sys.path]),
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "none" if budget is None else str(budget)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    return int(doc["peak"]) - int(doc["baseline"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_stays_within_max_pending_bytes() -> None:
    """Six 64 MiB saves to a storage that takes 0.3 s per data file: with max_pending=8 alone
    they would all be held at once; max_pending_bytes=128 MiB holds at most two copies."""
    margin = 48 * MiB
    bounded = peak_over_baseline(128 * MiB)
    assert bounded < 2 * 64 * MiB + margin, f"{bounded / MiB:.0f} MiB over the baseline"
    # The same run without the budget holds more: the bound above is the budget's doing.
    unbounded = peak_over_baseline(None)
    assert unbounded > 2 * 64 * MiB + margin, f"{unbounded / MiB:.0f} MiB over the baseline"

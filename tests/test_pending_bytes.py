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


# -- a state too big to copy (issue 18: no OOM) --------------------------------------------


def test_a_state_over_the_budget_is_written_while_the_caller_waits() -> None:
    """A copy over max_pending_bytes is not made: the save writes the caller's own arrays
    before save() returns (so the caller may change them at once) and commits in the
    background; ``blocked_seconds`` includes that write."""
    rng = np.random.default_rng(5)
    big = {"w": rng.standard_normal(1 << 20).astype(np.float32)}  # 4 MiB
    saved = big["w"].copy()
    small = {"w": np.ones(16, np.float32)}
    where = f"memory://staged-{uuid.uuid4().hex}"  # (sinkmem:// keeps no data to restore)
    with anyckpt.sync.CheckpointManager(where, max_pending_bytes=MiB) as manager:
        staged = manager.save(big, step=1)
        big["w"][:] = -1.0  # at once: the checkpoint has what save() was given
        staged.wait()
        copied = manager.save(small, step=2).wait()
        restored = manager.restore(step=1)
    assert np.array_equal(restored["w"], saved)
    assert staged.event is not None
    assert copied.event is not None
    assert staged.event.staged
    assert not copied.event.staged
    assert staged.event.blocked_seconds >= staged.event.write_seconds > 0


def test_a_state_over_most_of_the_available_memory_is_staged_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without max_pending_bytes, a state whose copy would take most of the memory the system
    has available is staged as well (here the system is made to report 1 MiB available)."""
    import anyckpt.save_control

    assert (anyckpt.save_control.available_memory() or 1) > 0  # the real probe answers
    monkeypatch.setattr(anyckpt.save_control, "available_memory", lambda: MiB)
    with anyckpt.sync.CheckpointManager(directory()) as manager:
        big = manager.save({"w": np.zeros(1 << 20, np.float32)}, step=1).wait()
        small = manager.save({"w": np.zeros(16, np.float32)}, step=2).wait()
    assert big.event is not None
    assert small.event is not None
    assert big.event.staged
    assert not small.event.staged


STAGED_CHILD = textwrap.dedent(
    """
    import json, sys, uuid
    import numpy as np
    import anyckpt
    import sink_fs  # registers sinkmem:// (writes that keep no data)

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    budget = None if sys.argv[1] == "none" else int(sys.argv[1])
    state = {f"w{i}": np.ones(32 * 2**20 // 4, np.float32) for i in range(6)}  # 192 MiB
    with anyckpt.sync.CheckpointManager(
        f"sinkmem://staged-{uuid.uuid4().hex}", max_to_keep=1, max_pending_bytes=budget
    ) as manager:
        manager.save({"w": np.ones(4, np.float32)}, step=1).wait()  # warm up the code paths
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = rss("VmRSS")
        events = [manager.save(state, step=step).wait().event for step in (2, 3)]
        peak = rss("VmHWM")
    print(json.dumps({"baseline": baseline, "peak": peak, "staged": [e.staged for e in events]}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_staged_save_holds_no_copy() -> None:
    """192 MiB saves with a 32 MiB budget: no copy is held (peak RSS over the baseline well
    under one state), where copying would hold the whole state."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), *sys.path]),
    }

    def run(budget: int | None) -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, "-c", STAGED_CHILD, "none" if budget is None else str(budget)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        doc: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
        return doc

    staged = run(32 * MiB)
    assert staged["staged"] == [True, True]
    over = int(staged["peak"]) - int(staged["baseline"])  # type: ignore[call-overload]
    assert over < 64 * MiB, f"{over / MiB:.0f} MiB over the baseline"
    copied = run(None)  # the same saves, copied: the state's size is held
    assert copied["staged"] == [False, False]
    held = int(copied["peak"]) - int(copied["baseline"])  # type: ignore[call-overload]
    assert held > 160 * MiB, f"{held / MiB:.0f} MiB over the baseline"  # ~192: one copy

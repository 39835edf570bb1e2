"""Endurance (issue 7, part 5): a thousand consecutive saves with ``max_to_keep=3``.

Memory (Python allocations by tracemalloc, and the process's RSS) and open file descriptors
(``/proc/self/fd``) are measured after a warm-up and at the end, and must stay flat; the
directory is listed after every ``save()`` (while the save is being written in the background)
and never holds more than the policy's three checkpoints plus the one in flight. CI mode: 1,000
saves on memory:// and on local disk; ``ANYCKPT_RELIABILITY=long``: 10,000.
"""

from __future__ import annotations

import gc
import os
import re
import threading
import tracemalloc
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from reliability_common import record_figures, scaled

from anyckpt import CheckpointManager
from anyckpt.storage import Storage

pytestmark = pytest.mark.anyio

SAVES = scaled(1000, 10000)
WARMUP = 100
KEEP = 3
_STEP = re.compile(r"ckpt-(\d+)\.")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _state(step: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((16, 16), step, dtype=np.float32),
        "b": np.arange(16, dtype=np.int64) + step,
        "step": np.array(step),
    }


@pytest.mark.parametrize("kind", ["memory", "local"])
async def test_a_thousand_saves_stay_flat(kind: str, tmp_path: Path) -> None:
    if kind == "memory":
        root = f"endurance-{uuid.uuid4().hex[:12]}"
        url = f"memory://{root}/ckpt"
    else:
        url = str(tmp_path / "ckpt")
    storage, path = Storage.from_url(url)
    seen = [0, 0]  # listings, most checkpoints seen (no allocation per listing: it is traced)
    stop = threading.Event()

    def watch() -> None:
        """List the directory over and over while the saves run: at no moment more than the
        policy's checkpoints plus the one being written."""
        while not stop.is_set():
            try:
                names = storage.listdir(path)
            except RuntimeError:  # memory://'s dict changed while listed
                continue
            present = {int(m.group(1)) for n in names if (m := _STEP.match(n))}
            seen[0] += 1
            seen[1] = max(seen[1], len(present))
            stop.wait(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    tracemalloc.start()
    watcher.start()
    try:
        # Local disk without fsync: this measures leaks, not durability (the crash and fault
        # suites do), and a thousand fsync'd saves take most of a minute on slow disks.
        async with CheckpointManager(url, max_to_keep=KEEP, durable=False) as manager:
            for step in range(1, SAVES + 1):
                await manager.save(_state(step), step=step)
                if step == WARMUP:
                    await manager.wait()
                    gc.collect()
                    base = (tracemalloc.get_traced_memory()[0], _rss(), _fds())
            await manager.wait()
            gc.collect()
            end = (tracemalloc.get_traced_memory()[0], _rss(), _fds())
            assert manager.latest_step == SAVES
            restored = await manager.restore()
            assert restored["step"] == SAVES
            assert [p.rsplit("-", 1)[1] for p in manager.checkpoints] == [
                str(s) for s in range(SAVES - KEEP + 1, SAVES + 1)
            ]
    finally:
        stop.set()
        watcher.join(30)
        tracemalloc.stop()
        if kind == "memory":
            store = fsspec.filesystem("memory").store
            for key in [k for k in store if k.startswith(f"/{root}/")]:
                del store[key]
    assert seen[0] > 100, "the watcher hardly listed the directory"
    assert seen[1] <= KEEP + 1, seen
    assert not watcher.is_alive()
    traced, rss, fds = (e - b for e, b in zip(end, base, strict=True))
    # Flat: what a thousand saves leave behind is noise, not a per-save leak (a leak of even
    # 1 KiB per save would show as ~900 KiB here).
    assert traced < 256 << 10, traced
    assert rss < 16 << 20, rss
    assert fds <= 0, fds
    record_figures(
        "endurance",
        {
            "backend": kind,
            "saves": SAVES,
            "listings": seen[0],
            "most checkpoints present": seen[1],
            "traced growth bytes": traced,
            "rss growth bytes": rss,
            "fd growth": fds,
        },
    )

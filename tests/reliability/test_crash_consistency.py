"""Crash consistency (issue 7, part 1): SIGKILL a training loop at random moments.

A child process (``writer_process.py train``) opens a manager on the directory and saves step
after step, two saves in flight, logging each step once ``await pending`` returned (a
confirmed commit). The parent kills it with SIGKILL at a random moment: while it starts, while
it opens the directory (lock, state file, debris cleanup), during writes, commits and
retention's deletes. Then a new manager on the directory must:

* find a latest checkpoint at least as new as the last confirmed commit (and as every commit
  of earlier trials), which restores with exactly that step's values;
* still restore every checkpoint retention keeps (the newest ``KEEP`` steps: every step up to
  the latest was committed, in order);
* have removed the interrupted save's debris (nothing but the state file, the lock and the
  tracked checkpoints' files is left);
* save again.

The directory carries over from trial to trial, so later trials start from a history of
crashes. CI mode: 30 trials on local disk, 8 on the S3 test server and 6 on the GCS emulator;
``ANYCKPT_RELIABILITY=long`` runs 300, 100 and 100.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from reliability_common import (
    assert_values,
    basename,
    checkpoint_files,
    record_figures,
    scaled,
    values,
)

from anyckpt import CheckpointManager
from anyckpt.lease import LOCK_FILE
from anyckpt.storage import TEMP_MARKER, Storage

pytestmark = pytest.mark.anyio

WRITER = Path(__file__).resolve().parent / "writer_process.py"
KEEP = 3
SHARDS = 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Setup:
    kind: str
    url: str
    options: dict[str, Any] | None
    trials: int
    big: int  # float32 elements of the extra tensor: how long a save takes
    window: float  # kills land up to this many seconds after the child is ready


def _read_log(path: Path) -> tuple[int | None, list[int]]:
    ready: int | None = None
    committed: list[int] = []
    if path.exists():
        for line in path.read_text().splitlines():
            word, _, number = line.partition(" ")
            if word == "ready":
                ready = int(number)
            elif word == "committed":
                committed.append(int(number))
    return ready, committed


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _read_log(log)[0] is not None:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


async def _run_trials(setup: Setup, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    storage, root = Storage.from_url(setup.url, setup.options)
    stats: Counter[str] = Counter()
    floor = 0  # every step up to here was committed (confirmed, or saved by us)
    for trial in range(setup.trials):
        log = tmp_path / f"trial-{trial}.log"
        config = {
            "url": setup.url,
            "options": setup.options,
            "mode": "train",
            "log": str(log),
            "max_to_keep": KEEP,
            "big": setup.big,
            "shards": SHARDS,
        }
        proc = subprocess.Popen([sys.executable, str(WRITER), json.dumps(config)])
        try:
            if rng.random() < 0.15:
                # Early: while the child starts and opens the directory.
                time.sleep(rng.uniform(0.0, 0.6))
                stats["killed early"] += 1
            else:
                assert _wait_ready(proc, log), f"trial {trial}: the child never got ready"
                time.sleep(rng.uniform(0.0, setup.window))
            assert proc.poll() is None, f"trial {trial}: the child exited by itself"
        finally:
            proc.kill()
            proc.wait()
        ready, confirmed = _read_log(log)
        stats["confirmed commits"] += len(confirmed)
        if ready is not None:
            assert ready >= floor, (trial, ready, floor)  # the child found all we had
        if confirmed:
            assert confirmed == list(range(confirmed[0], confirmed[-1] + 1))
            floor = max(floor, confirmed[-1])
        before = set(storage.listdir(root))

        async with CheckpointManager(
            setup.url,
            storage_options=setup.options,
            max_to_keep=KEEP,
            format_options={"num_shards": SHARDS},
        ) as manager:
            latest = manager.latest_step or 0
            # Nothing confirmed is lost; a commit the child made but did not get to log counts.
            assert latest >= floor, (trial, latest, floor, confirmed)
            stats["latest newer than the last confirmed"] += latest > floor
            floor = latest
            tracked = [int(basename(p).rsplit("-", 1)[1]) for p in manager.checkpoints]
            # Retention keeps the newest KEEP; one more may linger if the kill interrupted its
            # deletion (still tracked: the next commit deletes it).
            assert tracked[-KEEP:] == list(range(max(1, latest - KEEP + 1), latest + 1)), tracked
            assert len(tracked) <= KEEP + 1, tracked
            for step in tracked[-KEEP:]:
                assert_values(await manager.restore(step), step, setup.big)
            names = set(storage.listdir(root))
            allowed = {"checkpoint", LOCK_FILE}
            for step in tracked:
                allowed |= checkpoint_files(f"ckpt-{step}", SHARDS)
            assert names <= allowed, (trial, sorted(names - allowed))
            for step in tracked[-KEEP:]:
                assert checkpoint_files(f"ckpt-{step}", SHARDS) <= names
            stats["debris files removed"] += len(before - names - {LOCK_FILE})
            stats["temporary files found"] += sum(TEMP_MARKER in n for n in before)
            # And it saves again.
            floor = latest + 1
            await (await manager.save(values(floor, setup.big), step=floor))
            assert_values(await manager.restore(), floor, setup.big)
        stats["trials"] += 1
    record_figures("crash", {"backend": setup.kind, **stats, "last step": floor})
    assert stats["trials"] == setup.trials
    assert stats["confirmed commits"] > setup.trials  # the kills landed during saving


async def test_sigkill_at_random_moments_local_disk(tmp_path: Path) -> None:
    setup = Setup("local", str(tmp_path / "ckpt"), None, scaled(30, 300), big=64 << 10, window=0.3)
    await _run_trials(setup, tmp_path, seed=7)


async def test_sigkill_at_random_moments_s3(tmp_path: Path, s3_bucket: Any) -> None:
    setup = Setup(
        "s3",
        f"{s3_bucket.url}/ckpt",
        s3_bucket.storage_options,
        scaled(8, 100),
        big=16 << 10,
        window=0.8,
    )
    await _run_trials(setup, tmp_path, seed=11)


async def test_sigkill_at_random_moments_gcs(tmp_path: Path, gcs_bucket: Any) -> None:
    """The same on the GCS emulator (the lock a lease by ``ifGenerationMatch``, which
    tests/servers.py teaches the emulator)."""
    setup = Setup(
        "gcs",
        f"{gcs_bucket.url}/ckpt",
        gcs_bucket.storage_options,
        scaled(6, 100),
        big=16 << 10,
        window=0.8,
    )
    await _run_trials(setup, tmp_path, seed=13)

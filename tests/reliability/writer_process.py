"""A checkpoint writer in a process of its own, for the concurrency and crash suites.

    python writer_process.py CONFIG_JSON

CONFIG keys: ``url``, ``options`` (storage options), ``mode``, ``lease_seconds``, ``machine``
(pretend to be another host: replaces anyckpt.lease.MACHINE), ``max_to_keep``, ``log`` (a
file to append progress to), ``big`` (extra tensor elements), ``shards``.

Modes:
* ``hold``: open a manager, save one step, print ``READY <step>``, keep the directory until
  stdin reaches end-of-file, then close normally.
* ``try``: try to open a manager; print one JSON line: ``{"opened": true, "latest": N}`` or
  ``{"opened": false, "error": "ConcurrentWriterError", "message": ...}``.
* ``race``: wait until the file ``go`` names exists, then try to open a manager; print one JSON
  line: ``{"opened": true, "pid": P, "host": H}`` (then hold the directory until stdin reaches
  end-of-file) or ``{"opened": false, "error": ..., "message": ...}``. With ``unlocked``
  (test-only, to prove the race test can fail) the directory lock is skipped in this process.
* ``train``: the crash harness's training loop. Opens a manager, appends ``ready N`` to the log
  (N: the latest step it found), then saves step after step with two saves in flight, and
  appends ``committed S`` for each save once ``await pending`` has returned. Runs until killed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import deque
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_common import values

import anyckpt.lease
from anyckpt import CheckpointManager, ConcurrentWriterError


def _manager(config: dict[str, Any]) -> CheckpointManager:
    shards = int(config.get("shards", 1))
    return CheckpointManager(
        config["url"],
        storage_options=config.get("options"),
        max_to_keep=config.get("max_to_keep", 3),
        lease_seconds=float(config.get("lease_seconds", 60.0)),
        max_pending=2,
        format_options={"num_shards": shards} if shards > 1 else None,
    )


def _log(path: str, line: str) -> None:
    # One write() per line: whole lines survive a SIGKILL (the kernel has them).
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def hold(config: dict[str, Any]) -> None:
    async with _manager(config) as manager:
        step = (manager.latest_step or 0) + 1
        await (await manager.save(values(step), step=step))
        print(f"READY {step}", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)


async def attempt(config: dict[str, Any]) -> None:
    try:
        async with _manager(config) as manager:
            print(json.dumps({"opened": True, "latest": manager.latest_step}), flush=True)
    except ConcurrentWriterError as exc:
        print(
            json.dumps({"opened": False, "error": type(exc).__name__, "message": str(exc)}),
            flush=True,
        )


async def race(config: dict[str, Any]) -> None:
    go = Path(config["go"])
    while not go.exists():
        await anyio.sleep(0.005)
    try:
        async with _manager(config):
            mine = {"opened": True, "pid": os.getpid(), "host": socket.gethostname()}
            print(json.dumps(mine), flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
    except ConcurrentWriterError as exc:
        print(
            json.dumps({"opened": False, "error": type(exc).__name__, "message": str(exc)}),
            flush=True,
        )


def _skip_the_lock() -> None:
    """Test-only: this process takes no directory lock (the race test's negative control)."""

    def acquire(self: anyckpt.lease.DirectoryLock) -> None:
        self._acquired = True

    def confirm(self: anyckpt.lease.DirectoryLock) -> None:
        pass

    anyckpt.lease.DirectoryLock.acquire = acquire  # type: ignore[method-assign]
    anyckpt.lease.DirectoryLock.confirm = confirm  # type: ignore[method-assign]


async def train(config: dict[str, Any]) -> None:
    log, big = config["log"], int(config.get("big", 0))
    async with _manager(config) as manager:
        step = manager.latest_step or 0
        _log(log, f"ready {step}")
        inflight: deque[Any] = deque()
        while True:
            step += 1
            inflight.append(await manager.save(values(step, big), step=step, copy=False))
            while inflight and (inflight[0].done() or len(inflight) >= 2):
                pending = await inflight.popleft()
                _log(log, f"committed {pending.step}")


def _plain_gcsfs() -> None:
    """gs:// through gcsfs's plain GCSFileSystem, as the test session does (tests/servers.py):
    the default one probes the bucket over gRPC, which the emulator does not speak."""
    import fsspec
    import gcsfs.core

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    if str(config.get("url", "")).startswith(("gs://", "gcs://")):
        _plain_gcsfs()
    if config.get("machine"):
        anyckpt.lease.MACHINE = config["machine"]
    if config.get("unlocked"):
        _skip_the_lock()
    run = {"hold": hold, "try": attempt, "race": race, "train": train}[config["mode"]]
    anyio.run(run, config)


if __name__ == "__main__":
    main()

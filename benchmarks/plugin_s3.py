"""Plugin formats on the S3 test server: open and load of a many-tensor checkpoint, requests
per step, and how long the event loop stalls while a first manager opens S3.

    .venv/bin/python benchmarks/plugin_s3.py [--tensors 200] [--repeat 5] [--json F]

Starts the S3-protocol server the tests use (``tests/servers.py s3``: moto on 127.0.0.1,
stopped at the end). For each format (``v2``, ``safetensors``, ``zstd``) it saves ``--tensors``
float32 tensors of 4 KiB to 64 KiB, then times ``anyckpt.open`` (open to reader) and
``read_many`` of every tensor (load), best and median of ``--repeat``, counting the HTTP
requests each sends (botocore's ``before-send`` event).

Then, in a fresh interpreter (so s3fs and aiobotocore are not imported yet), a 1 ms ticker task
runs on the event loop while a first ``CheckpointManager`` opens an S3 directory, saves and
restores: the longest gap between ticks, per phase, is the longest the loop was blocked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _tensors(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"layer_{i:03d}/w": rng.standard_normal(int(rng.integers(1024, 16384))).astype(np.float32)
        for i in range(n)
    }


class _Requests:
    """Counts the HTTP requests an s3fs filesystem's client sends."""

    def __init__(self) -> None:
        self.count = 0

    def attach(self, fs: Any) -> None:
        fs.s3.meta.events.register("before-send.s3", self._seen)

    def _seen(self, **kwargs: Any) -> None:
        self.count += 1


async def _measure(url: str, options: dict[str, Any], fmt: str, n: int, repeat: int) -> dict:
    import anyckpt
    from anyckpt.storage import Storage

    tensors = _tensors(n)
    prefix = f"{url}/{fmt}/ckpt-1"
    await anyckpt.save(prefix, tensors, format=fmt, storage_options=options, durable=False)
    storage, _ = Storage.from_url(prefix, options)
    await storage.fs.set_session()
    counter = _Requests()
    counter.attach(storage.fs)
    opens, loads, open_requests, load_requests = [], [], 0, 0
    for _ in range(repeat):
        counter.count = 0
        start = time.perf_counter()
        reader = await anyckpt.open(prefix, storage_options=options)
        opened = time.perf_counter()
        open_requests = counter.count
        counter.count = 0
        out = await reader.read_many()
        loaded = time.perf_counter()
        load_requests = counter.count
        await reader.aclose()
        assert all(out[k].tobytes() == v.tobytes() for k, v in tensors.items())
        opens.append(opened - start)
        loads.append(loaded - opened)
    return {
        "format": fmt,
        "tensors": n,
        "bytes": sum(v.nbytes for v in tensors.values()),
        "open_s": {"best": min(opens), "median": statistics.median(opens)},
        "load_s": {"best": min(loads), "median": statistics.median(loads)},
        "open_requests": open_requests,
        "load_requests": load_requests,
    }


async def _ticker_run(url: str, options: dict[str, Any]) -> dict[str, float]:
    """A 1 ms ticker on the loop while a first manager opens S3, saves and restores."""
    gaps: dict[str, float] = {}
    phase = ["start"]
    last = [time.perf_counter()]
    stop = asyncio.Event()

    async def tick() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps[phase[0]] = max(gaps.get(phase[0], 0.0), now - last[0])
            last[0] = now

    import anyckpt  # (before the ticker) s3fs is not imported yet: the first manager does

    # Resolved before the ticker: ``anyckpt.CheckpointManager`` is imported lazily (the manager
    # package, ~160 modules), which is the trainer's own start-up, not the manager's open.
    manager_class = anyckpt.CheckpointManager
    assert "s3fs" not in sys.modules
    tensors = _tensors(50)
    task = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    phase[0] = "open"
    async with manager_class(
        f"{url}/ticker-{os.getpid()}-{time.time_ns()}", storage_options=options, durable=False
    ) as manager:
        phase[0] = "save"
        await (await manager.save(tensors, 1))
        phase[0] = "restore"
        await manager.restore()
        phase[0] = "close"
    phase[0] = "end"
    await asyncio.sleep(0.01)
    stop.set()
    await task
    return {k: round(v * 1000, 1) for k, v in gaps.items() if k not in ("start", "end")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--formats", default="v2,safetensors,zstd")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--ticker-child", nargs=2, metavar=("URL", "OPTIONS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.ticker_child:
        url, options = args.ticker_child[0], json.loads(args.ticker_child[1])
        print(json.dumps(asyncio.run(_ticker_run(url, options))))
        return

    import servers

    server = servers.ServerProcess("s3", Path("/tmp") / f"plugin_s3_{os.getpid()}.log")
    endpoint = server.start()
    try:
        os.environ.update(servers._aws_env(endpoint))
        options = servers.s3_storage_options(endpoint)
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir("bench")
        results = [
            asyncio.run(_measure("s3://bench", options, fmt, args.tensors, args.repeat))
            for fmt in args.formats.split(",")
        ]
        child = subprocess.run(
            [sys.executable, __file__, "--ticker-child", "s3://bench", json.dumps(options)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        ticker = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    for r in results:
        print(
            f"{r['format']:>12}: {r['tensors']} tensors, {r['bytes'] / 2**20:.1f} MiB: "
            f"open {r['open_s']['best'] * 1000:.0f} ms ({r['open_requests']} requests), "
            f"load {r['load_s']['best'] * 1000:.0f} ms ({r['load_requests']} requests) "
            f"[best of {args.repeat}; medians {r['open_s']['median'] * 1000:.0f} / "
            f"{r['load_s']['median'] * 1000:.0f} ms]"
        )
    print("event-loop gaps (longest, ms) of a first S3 manager:", ticker)
    if args.json:
        args.json.write_text(json.dumps({"formats": results, "loop_gaps_ms": ticker}, indent=1))


if __name__ == "__main__":
    main()

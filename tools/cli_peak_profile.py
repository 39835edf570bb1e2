"""Where ``anyckpt inspect`` or ``anyckpt verify`` spends memory at its peak (issue 18).

Runs the command once on a small checkpoint (imports and first-use caches out of the way),
then on PREFIX (its N tensors) while a thread watches tracemalloc and snapshots the traced
memory each time it grows by 3 %; prints the peak per tensor and the largest allocation sites
of the last snapshot (the peak, within 3 %), per tensor. ``--rss`` measures the RSS high-water
mark instead (as ``benchmarks/scaling.py`` does), without tracemalloc.

    PYTHONPATH=src .venv/bin/python tools/cli_peak_profile.py verify /tmp/c/ckpt 200000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
import tracemalloc

import anyio
import numpy as np

import anyckpt
from anyckpt.cli import main as cli_main


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _run(command: str, prefix: str) -> int:
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return cli_main([command, prefix])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("inspect", "verify"))
    parser.add_argument("prefix")
    parser.add_argument("count", type=int, help="the checkpoint's tensors")
    parser.add_argument("--rss", action="store_true", help="RSS high-water mark, no tracing")
    args = parser.parse_args()
    warm = os.path.join(tempfile.mkdtemp(), "c")
    small = {f"layer{i // 10}/w{i % 10}": np.zeros(4, np.float32) for i in range(100)}
    anyio.run(lambda: anyckpt.save(warm, small, durable=False))
    _run(args.command, warm)
    if args.rss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        _run(args.command, args.prefix)
        peak, after = _status("VmHWM") - base, _status("VmRSS") - base
        print(f"RSS peak {peak / args.count:.0f} B/tensor, held after {after / args.count:.0f}")
        return
    tracemalloc.start(8)
    best: list[tracemalloc.Snapshot] = []
    seen = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            current, _ = tracemalloc.get_traced_memory()
            if current > seen[0] * 1.03:
                best[:] = [tracemalloc.take_snapshot()]
                seen[0] = current
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    _run(args.command, args.prefix)
    done.set()
    watcher.join()
    _, peak = tracemalloc.get_traced_memory()
    count = args.count
    print(f"peak {peak / count:.0f} B/tensor (snapshot at {seen[0] / count:.0f})")
    for stat in best[0].statistics("traceback")[:20]:
        frames = " <- ".join(
            f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback[::-1][:4]
        )
        print(f"{stat.size / count:7.1f} B/tensor  {frames}")


if __name__ == "__main__":
    main()

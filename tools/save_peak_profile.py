"""Where a save of many tiny tensors spends memory at its peak (issue 18).

Saves N one-element float32 tensors (views of one array: the state itself costs the caller,
not the save) with ``anyckpt.save`` while a thread watches tracemalloc and snapshots the
traced memory each time it grows by 3 %; prints the peak per tensor and the largest
allocation sites of the last snapshot (the peak, within 3 %), per tensor.

    PYTHONPATH=src .venv/bin/python tools/save_peak_profile.py 200000        # 4 bytes each
    PYTHONPATH=src .venv/bin/python tools/save_peak_profile.py 200000 256    # 1 KiB each
    PYTHONPATH=src .venv/bin/python tools/save_peak_profile.py 200000 4 v1   # V1, 16 B each
    PYTHONPATH=src:plugins/anyckpt-zstd/src .venv/bin/python \
        tools/save_peak_profile.py 200000 1 zstd                              # another format
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import tracemalloc

import anyio
import numpy as np

import anyckpt


def main(count: int, elements: int = 1, format: str = "v2") -> None:
    base = np.zeros(count * elements, np.float32)
    state = {
        f"layer{i // 10}/w{i % 10}": base[i * elements : (i + 1) * elements] for i in range(count)
    }
    directory = tempfile.mkdtemp()
    tracemalloc.start(6)
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
    anyio.run(
        lambda: anyckpt.save(os.path.join(directory, "c"), state, format=format, durable=False)
    )
    done.set()
    watcher.join()
    _, peak = tracemalloc.get_traced_memory()
    print(f"peak {peak / count:.0f} B/tensor (snapshot at {seen[0] / count:.0f})")
    for stat in best[0].statistics("traceback")[:16]:
        frames = " <- ".join(
            f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback[::-1][:3]
        )
        print(f"{stat.size / count:7.1f} B/tensor  {frames}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        int(args[0]) if args else 200_000,
        int(args[1]) if len(args) > 1 else 1,
        args[2] if len(args) > 2 else "v2",
    )

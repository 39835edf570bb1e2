"""What a full restore of many small tensors must cost in Python (issue 18, target 1).

``many_small`` (10,000 float32 tensors of 256 elements, 9.8 MiB) is saved once; then, in one
process and interleaved round by round, this times anyckpt's full restore against one
``readinto`` of the same data file (the raw read of the same bytes) and against the pieces
that any reader handing back one separately owned, checked array per tensor must pay:

* ``np.empty`` of each array;
* scatter reads (``os.preadv``, 1,024 buffers a call) straight into them;
* a CRC-32C of each (one ``map`` over the C function);
* the ``dict`` of names to arrays;
* the sum of the four: the floor of such a reader without any index to parse;
* for comparison, arrays that are not owned: one ``readinto``, each tensor a checked row
  view of that one buffer (what safetensors' NumPy loader hands back, unchecked);
* opening the checkpoint and listing its keys (``anyckpt.open`` + ``keys()``: the footer,
  the index block and every key of the table).

    .venv/bin/python benchmarks/small_restore_floor.py [--rounds 21] [--scale 1]

Prints the median of each in milliseconds and as a multiple of ``readinto``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import crc32c
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import many_small  # noqa: E402

import anyckpt  # noqa: E402
from anyckpt.formats.v2_layout import data_path  # noqa: E402


def pieces(prefix: str, state: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
    data = data_path(prefix, 0, 1)
    names = sorted(state)
    shapes = [(state[k].shape, state[k].dtype) for k in names]
    arrays = [np.empty(*kind) for kind in shapes]
    offsets = np.cumsum([0] + [a.nbytes for a in arrays[:-1]]).tolist()

    def readinto() -> Any:
        buf = np.empty(os.path.getsize(data), np.uint8)
        with open(data, "rb", buffering=0) as f:
            f.readinto(memoryview(buf))
        return buf

    def empties() -> Any:
        return [np.empty(*kind) for kind in shapes]

    def preadv() -> None:
        fd = os.open(data, os.O_RDONLY)
        try:
            for lo in range(0, len(arrays), 1024):
                os.preadv(fd, arrays[lo : lo + 1024], offsets[lo])
        finally:
            os.close(fd)

    def crcs() -> Any:
        return np.fromiter(map(crc32c.crc32c, arrays), np.uint32, len(arrays))

    def mapping() -> Any:
        return dict(zip(names, arrays, strict=True))

    def floor() -> Any:
        empties()
        preadv()
        crcs()
        return mapping()

    rows = (len(arrays), arrays[0].nbytes)
    same_kind = all(kind == shapes[0] for kind in shapes)

    def views() -> Any:
        """One read into one buffer, each tensor a row view of it (not owned: one tensor kept
        keeps the whole buffer), checked row by row: what sharing a buffer would save."""
        buf = readinto()
        if not same_kind:
            return None
        by_row = list(buf[: rows[0] * rows[1]].reshape(rows))
        np.fromiter(map(crc32c.crc32c, by_row), np.uint32, len(by_row))
        typed = buf[: rows[0] * rows[1]].view(shapes[0][1]).reshape(len(arrays), *shapes[0][0])
        return dict(zip(names, list(typed), strict=True))

    def index_only() -> Any:
        async def go() -> int:
            async with anyckpt.open(prefix) as reader:
                return len(reader.keys())

        return anyio.run(go)

    def restore() -> Any:
        out: dict[str, Any] = {}

        async def go() -> None:
            out["t"] = await anyckpt.load(prefix)

        anyio.run(go)
        return out["t"]

    return {
        "readinto (the same bytes)": readinto,
        "np.empty per tensor": empties,
        "preadv into them": preadv,
        "crc32c per tensor": crcs,
        "dict of names": mapping,
        "floor: the four above": floor,
        "views of one buffer, checked": views,
        "index: open + keys()": index_only,
        "anyckpt full restore": restore,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    state = many_small(args.scale)
    with tempfile.TemporaryDirectory(prefix="anyckpt-floor-") as directory:
        prefix = os.path.join(directory, "ckpt")
        anyio.run(lambda: anyckpt.save(prefix, state))
        steps = pieces(prefix, state)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for fn in steps.values():  # warm up: imports, page cache, first-call set-up
            fn()
        for _ in range(args.rounds):
            for name, fn in steps.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["readinto (the same bytes)"])
    print(f"many_small × {args.scale}: {len(state):,} tensors; load {os.getloadavg()[0]:.2f}")
    print(f"| {'step':28s} | median ms | × readinto |")
    print(f"|{'-' * 30}|-----------|------------|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:28s} | {median * 1e3:9.2f} | {median / base:10.1f} |")


if __name__ == "__main__":
    main()

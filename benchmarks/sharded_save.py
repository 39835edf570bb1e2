"""Throughput of a sharded save against an unsharded one (local disk or any fsspec URL).

    .venv/bin/python benchmarks/sharded_save.py [--gib 1] [--shards 4] [--repeat 3] [--dir DIR]

Saves ``--gib`` GiB of float32 weights (64 tensors of equal size, seeded random data) with each
format, unsharded and split over ``--shards`` shards (``num_shards``), with and without fsync,
and prints the median wall time and throughput of each. Every save goes to a fresh prefix,
deleted afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

import anyckpt.sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--formats", default="v2,v1")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    total = int(args.gib * (1 << 30))
    per = total // args.tensors // 4
    rng = np.random.default_rng(0)
    tensors = {
        f"layer{i:03d}/w": rng.standard_normal(per, dtype=np.float32) for i in range(args.tensors)
    }
    nbytes = sum(t.nbytes for t in tensors.values())
    root = args.dir or tempfile.mkdtemp(prefix="anyckpt-bench-")
    print(f"{nbytes / (1 << 30):.2f} GiB in {len(tensors)} float32 tensors -> {root}")
    print(f"{'format':<6} {'shards':>6} {'fsync':>5} {'median s':>9} {'GiB/s':>6}  runs")
    counter = 0
    try:
        for fmt in args.formats.split(","):
            for shards in (1, args.shards):
                for durable in (True, False):
                    times = []
                    for _ in range(args.repeat):
                        counter += 1
                        prefix = f"{root}/run{counter}/ckpt"
                        options: dict[str, Any] = {"num_shards": shards} if shards > 1 else {}
                        started = time.perf_counter()
                        anyckpt.sync.save(
                            prefix, tensors, format=fmt, durable=durable, options=options
                        )
                        times.append(time.perf_counter() - started)
                        shutil.rmtree(f"{root}/run{counter}", ignore_errors=True)
                    median = statistics.median(times)
                    runs = " ".join(f"{t:.2f}" for t in times)
                    print(
                        f"{fmt:<6} {shards:>6} {'yes' if durable else 'no':>5} {median:>9.2f} "
                        f"{nbytes / (1 << 30) / median:>6.2f}  {runs}"
                    )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

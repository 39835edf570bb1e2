"""Peak memory of opening, listing and loading a checkpoint of many tiny tensors, per format.

    python benchmarks/entry_memory.py v1 300000 keys       # or load | one; v2, safetensors, zstd
    python benchmarks/entry_memory.py v2 100000 load --trace

The checkpoint (N scalar float32 tensors) is written on first use under ``--dir`` and reused.
Each run measures one operation in this process: the peak RSS over the baseline (VmHWM, reset
through /proc/self/clear_refs, Linux only) and, with ``--trace``, tracemalloc's peak beyond
what the operation returns, in bytes per entry.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from typing import Any

import numpy as np

import anyckpt.sync

SUFFIX = {"safetensors": ".safetensors", "zstd": ".zckpt"}


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=["v1", "v2", "safetensors", "zstd"])
    parser.add_argument("count", type=int)
    parser.add_argument("op", choices=["keys", "load", "one"])
    parser.add_argument("--trace", action="store_true", help="also measure with tracemalloc")
    parser.add_argument("--dir", default="/tmp/anyckpt-entry-memory")
    args = parser.parse_args()
    n = args.count
    path = os.path.join(args.dir, f"{args.format}-{n}", "ckpt" + SUFFIX.get(args.format, ""))
    if not os.path.exists(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
        one = np.zeros((), dtype=np.float32)
        state = {f"t{i:07d}": one for i in range(n)}
        anyckpt.sync.save(path, state, format=args.format, durable=False)
    gc.collect()
    reset_peak()
    base = peak_rss_mib()
    if args.trace:
        tracemalloc.start()
    started = time.perf_counter()
    result: Any
    if args.op == "keys":
        with anyckpt.sync.open(path) as reader:
            result = reader.keys()
    elif args.op == "load":
        result = anyckpt.sync.load(path)
    else:
        with anyckpt.sync.open(path) as reader:
            result = reader.read(f"t{n // 2:07d}")
    seconds = time.perf_counter() - started
    line = f"{args.format} {args.op} n={n}: peak RSS {peak_rss_mib():.0f} MiB (base {base:.0f})"
    if args.trace:
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        line += f", {(peak - held) / n:.0f} B/entry beyond the result"
    print(f"{line}, {seconds:.1f} s")
    del result


if __name__ == "__main__":
    main()

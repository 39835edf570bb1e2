"""The first save of a structure in a process against the saves after it.

    .venv/bin/python benchmarks/first_save.py [--workload many_small] [--processes 5]

From its second save of one structure (the same names, dtypes and shapes) on, anyckpt patches
the previous ``.index`` with the new checksums instead of building it, and reuses the names'
stored order; ``run.py`` measures that steady state (as it measures TensorFlow's, after its
session's first run). This script measures what the first save costs: each of
``--processes`` fresh processes warms up on a tiny state of the workload, then saves the full
state three times (page cache only, a fresh prefix each time); prints the median time of
each save.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

ONE_PROCESS = """
import gc, sys, tempfile, time, shutil
sys.path.insert(0, {here!r})
import anyio, anyckpt, workloads
tiny, state = workloads.build({workload!r}, 0.001), workloads.build({workload!r})
directory = tempfile.mkdtemp()
try:
    anyio.run(lambda: anyckpt.save(directory + "/warm", tiny, durable=False))
    for i in range(3):
        gc.collect()
        started = time.perf_counter()
        anyio.run(lambda: anyckpt.save(f"{{directory}}/save{{i}}", state, durable=False))
        print(time.perf_counter() - started)
finally:
    shutil.rmtree(directory)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="many_small")
    parser.add_argument("--processes", type=int, default=5)
    args = parser.parse_args()
    code = ONE_PROCESS.format(here=HERE, workload=args.workload)
    runs = [
        [float(line) for line in subprocess.check_output([sys.executable, "-c", code]).split()]
        for _ in range(args.processes)
    ]
    for i, label in enumerate(("first save", "second save", "third save")):
        times = [run[i] * 1e3 for run in runs]
        print(
            f"{args.workload} {label}: median {statistics.median(times):.1f} ms "
            f"(min {min(times):.1f}, max {max(times):.1f}, {args.processes} processes)"
        )


if __name__ == "__main__":
    main()

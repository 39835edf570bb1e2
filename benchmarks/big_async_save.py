"""An async save of a state near half of RAM (issue 18, target 3): peak RSS against the state,
and how long ``save()`` held the trainer, copied or staged.

Each configuration runs in a fresh process: it fills a state of ``--gib`` GiB (float32 arrays
of 256 MiB), opens an async ``CheckpointManager`` on ``--dir`` and saves it once, then prints
one JSON line: the state's bytes, the RSS high-water mark over the process's RSS before the
save (VmHWM, reset through /proc/self/clear_refs), ``blocked_seconds``, ``write_seconds``,
``throughput`` and whether the save was ``staged`` (written from the arrays while ``save()``
waited: over ``max_pending_bytes``, or over 80 % of the available memory).

    .venv/bin/python benchmarks/big_async_save.py --gib 10 --dir /tmp/big
    .venv/bin/python benchmarks/big_async_save.py --gib 2 --budget-mib 0   # copy (no budget)
    .venv/bin/python benchmarks/big_async_save.py --gib 0.0625 0.25 1 4 10 --budget-mib 1024 0 \\
        --out big.json   # the sweep; plot_scaling.py async big.json draws it

Bound checked (printed, not asserted): peak over the state <= max_pending_bytes + 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHILD = r"""
import json, sys, anyio, numpy as np, anyckpt

gib, budget, directory = float(sys.argv[1]), int(sys.argv[2]) or None, sys.argv[3]

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)

pieces = max(1, round(gib * 4))  # arrays of 256 MiB, or one array for a smaller state
elements = int(gib * 2**30) // 4 // pieces
state = {f"layer{i}": np.full(elements, i, np.float32) for i in range(pieces)}
nbytes = sum(a.nbytes for a in state.values())

async def main():
    async with anyckpt.CheckpointManager(
        directory, max_to_keep=1, max_pending_bytes=budget, durable=False
    ) as manager:
        await (await manager.save({"w": np.ones(4, np.float32)}, step=1))  # warm up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        pending = await manager.save(state, step=2)
        await pending
        event = pending.event
        return {
            "state_bytes": nbytes,
            "budget": budget,
            "peak_over_before": status("VmHWM") - before,
            "staged": event.staged,
            "blocked_seconds": round(event.blocked_seconds, 3),
            "capture_seconds": round(event.capture_seconds, 3),
            "write_seconds": round(event.write_seconds, 3),
            "throughput_mib_s": round(event.throughput / 2**20, 1),
        }

print(json.dumps(anyio.run(main)))
"""


def run_once(gib: float, budget_mib: int, directory: Path) -> dict[str, Any]:
    """One save of a ``gib`` GiB state in a fresh process; its JSON result, bound checked."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(gib), str(budget_mib << 20), str(directory)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["budget_mib"] = budget_mib
    if budget_mib:
        result["within_bound"] = result["peak_over_before"] <= (budget_mib << 20) + (64 << 20)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, nargs="+", default=[10.0], help="state sizes")
    parser.add_argument(
        "--budget-mib",
        type=int,
        nargs="+",
        default=[1024],
        help="max_pending_bytes of each configuration (0: none)",
    )
    parser.add_argument("--dir", default=None, help="where to save (a temporary directory)")
    parser.add_argument("--out", default=None, help="also write every result as one JSON file")
    args = parser.parse_args(argv)
    results = []
    for gib in args.gib:
        for budget in args.budget_mib:
            directory = Path(args.dir or tempfile.mkdtemp(prefix="anyckpt-big-"))
            result = {"gib": gib, **run_once(gib, budget, directory)}
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "big_async_save", "points": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost of the stale-snapshot guard's digests against the copy ``copy=False`` avoids
(docs/manager.md, "The stale-snapshot guard"): ``PYTHONPATH=src python tools/stale_check_cost.py``.
Best of five runs each; allocates ~0.5 GiB."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import numpy as np

from anyckpt.manager import capture
from anyckpt.staleness import digest


def best(fn: Callable[[], object], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    states = {
        "256 MiB in 8 tensors": {f"w{i}": np.ones(8 << 20, np.float32) for i in range(8)},
        "10,000 tensors of 1 KiB": {f"l{i}": np.ones(256, np.float32) for i in range(10_000)},
    }
    for name, state in states.items():
        for mode in ("sample", "full"):
            seconds = best(lambda: digest(state, mode))  # type: ignore[arg-type]  # noqa: B023
            print(f"{name}: digest {mode}: {seconds * 1e3:.2f} ms")
        seconds = best(lambda: anyio.run(capture, state))  # noqa: B023
        print(f"{name}: capture copy (copy=True): {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

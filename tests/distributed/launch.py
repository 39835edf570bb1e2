"""Run a scenario of worker.py on N real processes (one per rank) joined by torch.distributed.

Each rank is a ``python worker.py SCENARIO ARGS`` child with ``RANK``/``WORLD_SIZE`` set, as
torchrun sets them; they meet through a file store (no port to pick) and talk over gloo. Each
writes its result to ``OUT/rank{N}.json`` (arrays to ``rank{N}.npz``). The launcher waits for
all of them, never longer than ``timeout``: then it kills what is left and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    returncode: int | None
    result: dict[str, Any] | None
    arrays: dict[str, np.ndarray]
    stderr: str

    def ok(self) -> dict[str, Any]:
        """The result of a rank that exited normally (assertion error otherwise)."""
        assert self.returncode == 0, self.describe()
        assert self.result is not None, self.describe()
        return self.result

    def describe(self) -> str:
        return f"rank {self.rank} exited {self.returncode}; stderr:\n{self.stderr[-3000:]}"


def launch(
    scenario: str,
    world_size: int,
    workdir: Path,
    args: dict[str, Any] | None = None,
    *,
    timeout: float = 90.0,
) -> list[RankResult]:
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"out-{scenario}-{time.monotonic_ns()}"
    out.mkdir()
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(world_size),
        ANYCKPT_TEST_RDZV=f"file://{out / 'rendezvous'}",
        ANYCKPT_TEST_OUT=str(out),
        PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH")) if p
        ),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    for rank in range(world_size):
        log = (out / f"rank{rank}.log").open("wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, json.dumps(args or {})],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        timed_out = any(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    results = []
    for rank, proc in enumerate(procs):
        result_path = out / f"rank{rank}.json"
        arrays_path = out / f"rank{rank}.npz"
        arrays: dict[str, np.ndarray] = {}
        if arrays_path.exists():
            with np.load(arrays_path, allow_pickle=True) as npz:
                arrays = {k: npz[k] for k in npz.files}
        results.append(
            RankResult(
                rank,
                proc.returncode,
                json.loads(result_path.read_text()) if result_path.exists() else None,
                arrays,
                (out / f"rank{rank}.log").read_text(errors="replace"),
            )
        )
    if timed_out:
        raise AssertionError(
            f"{scenario} on {world_size} ranks did not finish in {timeout} s:\n"
            + "\n".join(r.describe() for r in results)
        )
    return results

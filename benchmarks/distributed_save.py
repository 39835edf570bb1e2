"""Save and restore throughput of a multi-process save (torch.distributed, gloo) on 1, 2 and 4
ranks, for the same total state.

    .venv/bin/python benchmarks/distributed_save.py [--ranks 1,2,4] [--gib 1] [--repeat 3]
                                                    [--tensors 16] [--dir DIR] [--no-fsync]

The state is ``--tensors`` float32 matrices of ``--gib`` GiB in all, each split by rows over
the ranks (``Sharded``, seeded random data), so every rank holds and writes ``1/ranks`` of it.
For each world size the ranks are real processes (this script with ``--worker``, meeting
through a file store). A save is timed from the moment every rank calls ``save()`` (after a
barrier) until every rank knows it is committed (a barrier after ``await pending``): capture,
writes, the merged index, the state file. A restore is timed the same way, each rank reading
its own rows of every tensor. Restores read what was just written (a warm page cache). Before
each save, dirty pages are flushed (``sync``), so runs without fsync start from a clean cache.
Prints the median of ``--repeat`` runs and the speed-up over one rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def worker(args: argparse.Namespace) -> None:
    import datetime

    import anyio
    import numpy as np
    import torch.distributed as dist

    import anyckpt
    from anyckpt.distributed import Sharded, TorchCoordinator, even_slice

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=os.environ["BENCH_RDZV"],
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
    )
    coordinator = TorchCoordinator(timeout=600)
    cols = 1024
    rows = int(args.gib * (1 << 30)) // (args.tensors * cols * 4)
    mine = even_slice(rows, rank, world)
    rng = np.random.default_rng(rank)
    state = {
        f"layer{i:03d}/w": Sharded(
            rng.standard_normal((mine.stop - mine.start, cols), dtype=np.float32),
            (rows, cols),
            (mine.start, 0),
        )
        for i in range(args.tensors)
    }
    total = args.tensors * rows * cols * 4
    saves: list[float] = []
    restores: list[float] = []

    async def run() -> None:
        async with anyckpt.CheckpointManager(
            args.dir, max_to_keep=1, durable=not args.no_fsync, coordinator=coordinator
        ) as manager:
            for step in range(1, args.repeat + 1):
                if rank == 0:
                    os.sync()  # no backlog of dirty pages from the run before (fsync off)
                await anyio.to_thread.run_sync(coordinator.barrier)
                started = time.perf_counter()
                await (await manager.save(state, step=step))
                await anyio.to_thread.run_sync(coordinator.barrier)
                saves.append(time.perf_counter() - started)
                started = time.perf_counter()
                got = await manager.restore(keys=dict.fromkeys(state, mine))
                await anyio.to_thread.run_sync(coordinator.barrier)
                restores.append(time.perf_counter() - started)
                assert all(np.array_equal(got[key], piece.local) for key, piece in state.items())
                del got

    anyio.run(run)
    if rank == 0:
        result = {"ranks": world, "bytes": total, "save_s": saves, "restore_s": restores}
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps(result))
    os._exit(0)


def run_world(world: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    out = root / f"result-{world}.json"
    directory = root / f"ckpt-{world}"
    env = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "BENCH_RDZV": f"file://{root / f'rdzv-{world}'}",
        "BENCH_OUT": str(out),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--dir",
        str(directory),
        "--gib",
        str(args.gib),
        "--tensors",
        str(args.tensors),
        "--repeat",
        str(args.repeat),
        *(["--no-fsync"] if args.no_fsync else []),
    ]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(rank)}) for rank in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{world} ranks: exit codes {codes}")
    result: dict[str, Any] = json.loads(out.read_text())
    subprocess.run(["rm", "-rf", str(directory)], check=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--no-fsync", action="store_true", help="durable=False")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="anyckpt-dist-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = [run_world(int(n), args, root) for n in args.ranks.split(",")]
    gib = results[0]["bytes"] / (1 << 30)
    print(
        f"{gib:.2f} GiB in {args.tensors} float32 tensors, fsync={'off' if args.no_fsync else 'on'}"
        f", {os.cpu_count()} CPUs, median of {args.repeat}; {root}"
    )
    print("| ranks | save s | save GiB/s | vs 1 | restore s | restore GiB/s | vs 1 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base: tuple[float, float] | None = None
    for r in results:
        save = statistics.median(r["save_s"])
        restore = statistics.median(r["restore_s"])
        base = base or (save, restore)
        print(
            f"| {r['ranks']} | {save:.2f} | {gib / save:.2f} | {base[0] / save:.2f}x "
            f"| {restore:.2f} | {gib / restore:.2f} | {base[1] / restore:.2f}x |"
        )


if __name__ == "__main__":
    main()

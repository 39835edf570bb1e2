"""Large tensors: writing and reading with their CRC-32C, against the plain limits, in one run.

Saves (page cache, no fsync) of ``--tensors`` tensors of ``--mib`` MiB into a fresh file:

- ``tofile``: ``ndarray.tofile`` of every tensor (the limit; no checksum);
- ``whole``: today's data-file writer: ``os.write`` of each tensor while a helper thread
  checksums whole tensors ahead of the writes (``formats/v2_data.py``);
- ``lock-N/L``: :func:`anyckpt.formats._checksummed_io.write_checksummed`, chunks of N MiB,
  the CRC trailing by at most L chunks (``--lags``);
- ``+fa``: the file's blocks reserved first (:func:`~anyckpt.storage.preallocate`,
  ``fallocate``, which ``tofile`` does too).

Restores into fresh (2 MiB-aligned) arrays, cold (``drop_caches`` before each run; needs root)
and warm:

- ``dd``: ``dd if=F of=/dev/null bs=16M`` (the cold limit; one reused buffer, no checksum);
- ``readinto``: one ``readinto`` of the whole file into one fresh buffer (the warm limit);
- ``whole``: today's reader: ``preadv`` of each tensor, the helper checksums whole tensors
  behind the reads (``formats/v2_reader.py``);
- ``lock-N/L``: :func:`anyckpt.formats._checksummed_io.read_checksummed`, chunks of N MiB.

``--durable``: the saves fsync their file inside the clock (``tofile`` then ``fsync``).

Every tool runs once per round, rounds interleaved; reported: best and median wall time,
CPU time (all threads) of the best run, throughput and the ratio to the limit, and the load
average before each round. Checksums are checked against one ``masked_crc32c`` per tensor.

    .venv/bin/python benchmarks/large_io.py --runs 9
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from anyckpt.codecs.crc import masked_crc32c
from anyckpt.formats._arrays import byte_view, empty_large
from anyckpt.formats._checksummed_io import (
    LAG_CHUNKS,
    read_checksummed,
    write_checksummed,
)
from anyckpt.storage import preallocate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
from _harness import drop_caches  # one copy, shared with the suite

MiB = 1 << 20
#: Saves fsync their file inside the clock (``--durable``).
DURABLE = False


def write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view) :]


def read_all(fd: int, offset: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError("short read")
        view = view[n:]
        offset += n


# -- saves: each returns the masked CRCs (empty for the limit) ----------------------------------


def save_tofile(path: str, arrays: list[np.ndarray], pool: ThreadPoolExecutor) -> list[int]:
    with open(path, "wb") as f:
        for array in arrays:
            array.tofile(f)
        if DURABLE:
            f.flush()
            os.fsync(f.fileno())
    return []


Save = Callable[[str, list[np.ndarray], ThreadPoolExecutor], list[int]]


def create(path: str, arrays: list[np.ndarray], reserve: bool) -> int:
    """A new file (as the data-file writer creates it), its blocks reserved if ``reserve``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    if reserve:
        preallocate(fd, 0, sum(a.nbytes for a in arrays))
    return fd


def save_whole(reserve: bool) -> Save:
    def save(path: str, arrays: list[np.ndarray], pool: ThreadPoolExecutor) -> list[int]:
        views = [byte_view(a) for a in arrays]
        crcs = pool.submit(lambda: [masked_crc32c(v) for v in views])
        fd = create(path, arrays, reserve)
        try:
            for view in views:
                write_all(fd, view)
            if DURABLE:
                os.fsync(fd)
        finally:
            os.close(fd)
        return crcs.result()

    return save


def save_lockstep(chunk: int, reserve: bool, lag: int = LAG_CHUNKS) -> Save:
    def save(path: str, arrays: list[np.ndarray], pool: ThreadPoolExecutor) -> list[int]:
        fd = create(path, arrays, reserve)
        try:
            futures = [
                write_checksummed(lambda v: write_all(fd, v), byte_view(a), pool, chunk, lag)
                for a in arrays
            ]
            crcs = [f.result() for f in futures]
            if DURABLE:
                os.fsync(fd)
            return crcs
        finally:
            os.close(fd)

    return save


# -- restores: each returns (arrays, masked CRCs) -----------------------------------------------

Restore = Callable[[str, int, int, ThreadPoolExecutor], tuple[list[np.ndarray], list[int]]]


def restore_readinto(
    path: str, count: int, size: int, pool: ThreadPoolExecutor
) -> tuple[list[np.ndarray], list[int]]:
    buf = np.empty(count * size, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        view = buf.data
        while view.nbytes:
            n = f.readinto(view)
            if not n:
                raise OSError("short read")
            view = view[n:]
    return [buf], []


def restore_whole(
    path: str, count: int, size: int, pool: ThreadPoolExecutor
) -> tuple[list[np.ndarray], list[int]]:
    fd = os.open(path, os.O_RDONLY)
    arrays, futures = [], []
    try:
        for i in range(count):
            array = empty_large((size // 4,), np.dtype("<f4"))
            view = byte_view(array)
            read_all(fd, i * size, view)
            futures.append(pool.submit(masked_crc32c, view))
            arrays.append(array)
    finally:
        os.close(fd)
    return arrays, [f.result() for f in futures]


def restore_lockstep(chunk: int, lag: int = LAG_CHUNKS) -> Restore:
    def restore(
        path: str, count: int, size: int, pool: ThreadPoolExecutor
    ) -> tuple[list[np.ndarray], list[int]]:
        fd = os.open(path, os.O_RDONLY)
        arrays, futures = [], []
        try:
            for i in range(count):
                array = empty_large((size // 4,), np.dtype("<f4"))
                futures.append(
                    read_checksummed(
                        lambda o, v: read_all(fd, o, v),
                        i * size,
                        byte_view(array),
                        pool,
                        chunk,
                        lag,
                    )
                )
                arrays.append(array)
        finally:
            os.close(fd)
        return arrays, [f.result() for f in futures]

    return restore


def run_dd(path: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=16M"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def load1() -> float:
    return os.getloadavg()[0]


def report(
    title: str, results: dict[str, list[tuple[float, float]]], limit: str, nbytes: int
) -> None:
    print(f"\n{title}  (best-of-{len(next(iter(results.values())))}; ratio = limit's best ÷ best)")
    print(f"{'tool':<14}{'best s':>9}{'median s':>10}{'CPU s':>8}{'GB/s':>8}{'÷ limit':>9}")
    base = min(w for w, _ in results[limit]) if limit in results else None
    for tool, runs in results.items():
        best = min(runs)
        med = statistics.median(w for w, _ in runs)
        ratio = f"{base / best[0]:.2f}" if base else "-"
        print(
            f"{tool:<14}{best[0]:>9.4f}{med:>10.4f}{best[1]:>8.3f}{nbytes / best[0] / 1e9:>8.2f}"
            f"{ratio:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8], help="MiB")
    parser.add_argument(
        "--lags", type=int, nargs="+", default=[LAG_CHUNKS], help="chunks the CRC may trail"
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--only", choices=["save", "restore"], default=None)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold restores")
    parser.add_argument("--durable", action="store_true", help="saves fsync (in the clock)")
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed threshold stops glibc from raising it after the first large free(), which
        # would serve later rounds' arrays from already-faulted heap memory: every array is
        # then fresh memory, as in the fresh process of a real restore.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    global DURABLE
    DURABLE = args.durable

    size = args.mib * MiB
    nbytes = size * args.tensors
    directory = tempfile.mkdtemp(prefix="large_io-", dir=args.dir)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(size // 4, dtype=np.float32)
    arrays = [base + np.float32(i) for i in range(args.tensors)]  # distinct, no zero pages
    expected = [masked_crc32c(byte_view(a)) for a in arrays]
    pool = ThreadPoolExecutor(1, thread_name_prefix="crc")
    loads: list[float] = []
    print(
        f"{args.tensors} x {args.mib} MiB = {nbytes / MiB:,.0f} MiB in {directory}; "
        f"load before: {load1():.2f}"
    )
    try:
        saves: dict[str, Save] = {
            "tofile": save_tofile,
            "whole": save_whole(False),
            "whole+fa": save_whole(True),
            f"lock-{args.chunks[0]}": save_lockstep(args.chunks[0] * MiB, False),
        }
        saves.update(
            {
                f"lock-{c}/{lag}+fa": save_lockstep(c * MiB, True, lag)
                for c in args.chunks
                for lag in args.lags
            }
        )
        restores: dict[str, Restore] = {"whole": restore_whole}
        restores.update(
            {
                f"lock-{c}/{lag}": restore_lockstep(c * MiB, lag)
                for c in args.chunks
                for lag in args.lags
            }
        )
        save_res: dict[str, list[tuple[float, float]]] = {k: [] for k in saves}
        cold_res: dict[str, list[tuple[float, float]]] = {"dd": [], **{k: [] for k in restores}}
        warm_res: dict[str, list[tuple[float, float]]] = {
            "readinto": [],
            **{k: [] for k in restores},
        }
        data = os.path.join(directory, "data.bin")
        save_tofile(data, arrays, pool)  # the file the restores read
        cold = not args.no_cold
        for _ in range(args.runs):
            loads.append(load1())
            if args.only != "restore":
                for tool, fn in saves.items():
                    if DURABLE:
                        os.sync()  # the previous round's dirty pages are not this one's
                    path = os.path.join(directory, "save-" + tool.replace("/", "_") + ".bin")
                    t0, c0 = time.perf_counter(), time.process_time()
                    crcs = fn(path, arrays, pool)
                    save_res[tool].append((time.perf_counter() - t0, time.process_time() - c0))
                    if crcs and crcs != expected:
                        sys.exit(f"{tool}: wrong checksums")
                    os.unlink(path)
            if args.only == "save":
                continue
            for tool, results, kind in [
                *([("dd", cold_res, "cold")] if cold else []),
                *([(t, cold_res, "cold") for t in restores] if cold else []),
                ("readinto", warm_res, "warm"),
                *[(t, warm_res, "warm") for t in restores],
            ]:
                if kind == "cold":
                    if not drop_caches():
                        sys.exit("cannot drop caches (not root?): use --no-cold")
                else:
                    restore_readinto(data, args.tensors, size, pool)  # warm the page cache
                if tool == "dd":
                    results[tool].append(run_dd(data))
                    continue
                restore = restore_readinto if tool == "readinto" else restores[tool]
                t0, c0 = time.perf_counter(), time.process_time()
                out, got = restore(data, args.tensors, size, pool)
                results[tool].append((time.perf_counter() - t0, time.process_time() - c0))
                if got and got != expected:
                    sys.exit(f"{tool} ({kind}): wrong checksums")
                del out
    finally:
        pool.shutdown()
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"load average (1 min) before each round: min {min(loads):.2f}, "
        f"median {statistics.median(loads):.2f}, max {max(loads):.2f} ({os.cpu_count()} cores)"
    )
    if args.only != "restore":
        title = "save, durable (fsync)" if DURABLE else "save, page cache"
        report(title, save_res, "tofile", nbytes)
    if args.only != "save":
        if cold:
            report("restore, cold cache", cold_res, "dd", nbytes)
        report("restore, warm cache", warm_res, "readinto", nbytes)


if __name__ == "__main__":
    main()

"""A distributed save at 1,024 to 8,192 ranks, simulated in one process with the library's own
code: what rank 0's planning, merge and commit cost, what the collectives move, and how many
object-store requests each rank makes.

    .venv/bin/python benchmarks/distributed_scale.py --ranks 1024 --tensors 1000 \\
        [--layout fsdp|tp|replicated] [--no-data] [--restore-ranks 3] [--json] [--out FILE]
    .venv/bin/python benchmarks/distributed_scale.py --sweep 64,256,1024,4096,8192 \\
        --sweep-tensors 100,1000 --out benchmarks/results/distributed-scale.json

``--sweep`` runs each (ranks, tensors) pair metadata-only (``--no-data``) in a process of its
own and writes the list of results; ``benchmarks/plot.py`` draws them.

Every rank's part runs the code a real rank runs (``anyckpt.distributed``): ``prepare_state``
on the rank's own state, the primary's ``make_plan`` and ``assign`` over every rank's
manifest, each rank's ``write_data_file`` of its share (to ``memory://``; with ``--no-data``
the entries it would report are computed instead and nothing is written, for the metadata
alone), the primary's ``build_index`` merge and its commit (index, then state file, through a
real ``CheckpointManager``). Only the transport is simulated: each message is pickled as
``torch.distributed``'s object collectives pickle it, and ``collective_bytes`` adds up what
every rank receives. Ranks run one after another; the times are rank 0's (the ranks' own
parts run in parallel in a real job and are not on the critical path at scale).

The state is transformer-like: blocks of attention and MLP matrices, layer norms and an
embedding, ``--tensors`` in all. ``fsdp`` splits every tensor by rows over all ranks; ``tp``
splits every matrix by columns over tensor-parallel groups of 8 and replicates it over the
data-parallel groups (the plan writes each piece once); ``replicated`` gives every rank every
tensor whole.

Requests per rank are the storage operations each rank makes, counted at anyckpt's one storage
seam (``Storage``): every whole-object write is one PUT (a multipart upload is more: see
docs/distributed.md), every ranged read one GET. The restore is at half the world size: each
of ``--restore-ranks`` sampled ranks reads its rows of every tensor, as
``CheckpointManager.restore(keys={name: rows})`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import anyckpt
from anyckpt.distributed import Sharded, even_slice
from anyckpt.distributed import plan as plan_module
from anyckpt.formats import get_format
from anyckpt.formats.sharded import ShardOptions
from anyckpt.formats.v2_data import DataFileEntries, write_data_file
from anyckpt.formats.v2_index import build_index
from anyckpt.formats.v2_layout import data_path, index_path
from anyckpt.manager.distributed import prepare_state
from anyckpt.storage import Storage, coalesce

TP_DEGREE = 8
MIB = 1 << 20
#: S3's documented request rates per partitioned prefix (requests per second).
S3_PUT_RATE, S3_GET_RATE = 3500, 5500

# -- the state -------------------------------------------------------------------------------


def layer_shapes(tensors: int, rows: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    """``tensors`` names and global shapes, laid out like a transformer's parameters."""
    block = [
        ("attn/qkv/kernel", (rows, 3 * width)),
        ("attn/out/kernel", (rows, width)),
        ("mlp/fc1/kernel", (rows, 4 * width)),
        ("mlp/fc2/kernel", (rows, width)),
        ("ln1/scale", (rows,)),
        ("ln2/scale", (rows,)),
    ]
    out: list[tuple[str, tuple[int, ...]]] = [("embed/table", (rows, width))]
    layer = 0
    while len(out) < tensors:
        for name, shape in block:
            if len(out) < tensors:
                out.append((f"layers/{layer:05d}/{name}", shape))
        layer += 1
    return out


def rank_state(
    shapes: list[tuple[str, tuple[int, ...]]], rank: int, world: int, layout: str, data: bool
) -> dict[str, Any]:
    """One rank's state: its pieces (``Sharded``) or whole tensors. Without data, every array
    is a zero-strided view (no memory): only names, dtypes and shapes matter then."""

    def array(shape: tuple[int, ...]) -> np.ndarray:
        if data:
            return np.full(shape, rank, np.float32)
        return np.broadcast_to(np.float32(0), shape)

    state: dict[str, Any] = {}
    for name, shape in shapes:
        if layout == "replicated":
            state[name] = array(shape)
            continue
        if layout == "fsdp" or len(shape) == 1:
            axis = 0
            part = even_slice(shape[0], rank, world)
        else:  # tp: columns over a group of TP_DEGREE, replicated across the groups
            axis = 1
            degree = min(TP_DEGREE, world)
            part = even_slice(shape[1], rank % degree, degree)
        local = tuple(part.stop - part.start if i == axis else d for i, d in enumerate(shape))
        offsets = [part.start if i == axis else 0 for i in range(len(shape))]
        state[name] = Sharded(array(local), shape, offsets)
    return state


# -- counting what each rank asks of the storage ---------------------------------------------


@dataclass
class Requests:
    puts: int = 0
    gets: int = 0
    get_bytes: int = 0
    ranges: list[tuple[str, int, int]] = field(default_factory=list)


class CountingStorage:
    """Counts the storage seam's operations: whole writes (PUT) and ranged reads (GET)."""

    def __init__(self) -> None:
        self.current = Requests()
        self._patch()

    @contextmanager
    def counting(self) -> Iterator[Requests]:
        saved, self.current = self.current, Requests()
        try:
            yield self.current
        finally:
            self.current = saved

    @staticmethod
    def counts(path: str) -> int:
        """1 for a checkpoint's files, 0 for the directory's lease (renewed in the background,
        whatever the ranks do)."""
        return 0 if path.endswith(".lock") else 1

    def _patch(self) -> None:
        counter = self
        open_writer, write_bytes, open_reader, read_bytes = (
            Storage.open_writer,
            Storage.write_bytes,
            Storage.open_reader,
            Storage.read_bytes,
        )

        def counted_open_writer(self: Storage, path: str, **kw: Any) -> Any:
            counter.current.puts += counter.counts(path)
            return open_writer(self, path, **kw)

        def counted_write_bytes(self: Storage, path: str, data: Any, **kw: Any) -> None:
            counter.current.puts += counter.counts(path)
            write_bytes(self, path, data, **kw)

        def counted_read_bytes(self: Storage, path: str, **kw: Any) -> bytes:
            data: bytes = read_bytes(self, path, **kw)
            counter.current.gets += counter.counts(path)
            counter.current.get_bytes += len(data)
            counter.current.ranges.append((path, 0, len(data)))
            return data

        def counted_open_reader(self: Storage, path: str) -> Any:
            return _CountingReader(open_reader(self, path), path, counter)

        Storage.open_writer = counted_open_writer  # type: ignore[method-assign]
        Storage.write_bytes = counted_write_bytes  # type: ignore[method-assign]
        Storage.open_reader = counted_open_reader  # type: ignore[method-assign]
        Storage.read_bytes = counted_read_bytes  # type: ignore[method-assign]


class _CountingReader:
    def __init__(self, inner: Any, path: str, counter: CountingStorage) -> None:
        self._inner, self._path, self._counter = inner, path, counter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _count(self, offset: int, length: int) -> None:
        requests = self._counter.current
        requests.gets += 1
        requests.get_bytes += length
        requests.ranges.append((self._path, offset, length))

    def read(self, offset: int, length: int) -> bytes:
        self._count(offset, length)
        data: bytes = self._inner.read(offset, length)
        return data

    def read_into(self, offset: int, buffer: Any) -> None:
        self._count(offset, memoryview(buffer).nbytes)
        self._inner.read_into(offset, buffer)

    def read_into_many(self, requests: Any) -> None:
        for offset, buffer in requests:
            self._count(offset, memoryview(buffer).nbytes)
        self._inner.read_into_many(requests)

    def read_ranges_into(self, requests: Any) -> None:
        """One GET per request that a remote store's reader makes of these ranges: neighbours
        merged as :func:`anyckpt.storage.coalesce` merges them."""
        ranges = [(offset, memoryview(buffer).nbytes) for offset, buffer in requests]
        for start, end, _ in coalesce(ranges):
            if end > start:
                self._count(start, end - start)
        self._inner.read_ranges_into(requests)


def coalesced(ranges: list[tuple[str, int, int]], gap: int = 1 << 20) -> int:
    """How many GETs the same ranges take when neighbours (within ``gap``) are merged."""
    count = 0
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, offset, length in ranges:
        by_file.setdefault(path, []).append((offset, offset + length))
    for spans in by_file.values():
        spans.sort()
        end = -math.inf
        for start, stop in spans:
            if start > end + gap:
                count += 1
            end = max(end, stop)
    return count


# -- the simulation --------------------------------------------------------------------------


def entries_without_data(shard: int, items: tuple[plan_module.Item, ...]) -> DataFileEntries:
    """The entries ``write_data_file`` reports for ``items``, computed without the bytes."""
    sizes = np.fromiter((item.nbytes for item in items), np.int64, len(items))
    offsets = np.zeros(len(items), np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    shapes = [
        item.shape if item.extents is None else tuple(n for _, n in item.extents) for item in items
    ]
    return DataFileEntries.from_lists(
        shard,
        [item.data_key for item in items],
        [item.dtype for item in items],
        shapes,
        offsets,
        sizes,
        np.full(len(items), 0x1EDC6F41, np.uint32),  # any non-zero masked CRC
    )


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the CPU seconds it took (on a busy machine, wall time measures the
    load)."""
    started = time.process_time()
    result = fn(*args)
    return result, time.process_time() - started


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def simulate(args: argparse.Namespace) -> dict[str, Any]:
    world, layout, data = args.ranks, args.layout, not args.no_data
    rows = max(world, 64) * args.rows_per_rank
    shapes = layer_shapes(args.tensors, rows, args.width)
    counter = CountingStorage()
    url = args.dir or f"memory://anyckpt-sim-{world}-{layout}"
    storage, root = Storage.from_url(url)
    name = "ckpt-1"
    prefix = f"{root}/{name}"
    manager = anyckpt.CheckpointManager(url, max_to_keep=3)
    async with manager:
        # Each rank prepares its state and sends its manifest to the primary.
        manifests: list[plan_module.Manifest] = []
        arrays_of: list[dict[Any, np.ndarray]] = []
        manifest_bytes = 0
        for rank in range(world):
            items, arrays = prepare_state(rank_state(shapes, rank, world, layout, data))
            manifest = plan_module.Manifest(name, items)
            manifest_bytes += len(pickle.dumps(manifest))
            manifests.append(manifest)
            arrays_of.append(arrays)
        progress(f"{world} manifests prepared; planning")
        # The primary plans and tells each rank its share.
        options = ShardOptions()
        plan, plan_s = timed(plan_module.make_plan, manifests, options)
        linear = hasattr(plan_module, "assign")  # False on a checkout before the scatter
        assign_s = 0.0
        if linear:
            assignments, assign_s = timed(plan_module.assign, plan, manifests)
            plan_bytes = sum(len(pickle.dumps(a)) for a in assignments)
        progress(f"planned in {plan_s + assign_s:.2f} s CPU; writing")
        # Each rank writes its files and reports their entries to the primary.
        reports: list[list[DataFileEntries]] = []
        save_requests: list[Requests] = []
        report_bytes = 0
        for rank in range(world):
            with counter.counting() as requests:
                files = []
                for shard, shard_items in plan.files_of(rank):
                    if data:
                        keys = [i.data_key for i in shard_items]
                        units = [arrays_of[rank][i.unit] for i in shard_items]
                        path = data_path(prefix, shard, plan.num_shards)
                        files.append(
                            write_data_file(storage, path, keys, units, False, shard, lambda: None)
                        )
                    else:
                        files.append(entries_without_data(shard, shard_items))
                        requests.puts += 1  # the PUT it would make
            reports.append(files)
            report_bytes += len(pickle.dumps(files))
            save_requests.append(requests)
        del arrays_of
        # The primary merges the index and commits.
        flat = [f for files in reports for f in files]
        table, merge_s = timed(build_index, plan.num_shards, flat, plan.holders)
        progress(f"merged {len(table):,} index bytes; committing")
        started = time.process_time()
        with counter.counting() as commit_requests:
            storage.write_bytes(index_path(prefix), table, durable=False)
            await manager.checkpoint_dir.commit(name)  # as manager/distributed.py does
        commit_s = time.process_time() - started
        outcome_bytes = len(pickle.dumps(manager.checkpoint_dir.state))

    # What the collectives moved: every byte each rank receives, summed over the ranks.
    hello = len(pickle.dumps((url, "ckpt", "v2")))
    if linear:
        collectives = {
            "open: gather + broadcast": world * hello + world * outcome_bytes,
            "manifests: gather to rank 0": manifest_bytes,
            "plan: scatter from rank 0": plan_bytes,
            "reports: gather to rank 0": report_bytes,
            "outcome: broadcast": world * outcome_bytes,
        }
    else:  # the protocol before: every rank all-gathers every manifest and plans
        collectives = {
            "open: all_gather + broadcast": world * world * hello + world * outcome_bytes,
            "manifests: all_gather": world * manifest_bytes,
            "reports: gather to rank 0": report_bytes,
            "outcome: broadcast": world * outcome_bytes,
        }

    progress("measuring rank 0's peak memory")
    # Rank 0's peak: a process of its own that receives what rank 0 receives (the pickled
    # manifests and reports), plans, merges, and reports its peak RSS above its start.
    index_bytes = len(table)
    entries = sum(len(f.keys) for f in flat) + len(plan.holders)
    with tempfile.TemporaryDirectory() as scratch:
        messages = os.path.join(scratch, "rank0.pickle")
        with open(messages, "wb") as out:
            pickle.dump(([pickle.dumps(m) for m in manifests], pickle.dumps(reports)), out)
        del manifests, reports, flat, plan, table
        child = subprocess.run(
            [sys.executable, __file__, "--rank0-child", messages],
            capture_output=True,
            text=True,
            check=True,
        )
    rank0_peak = int(child.stdout.split()[-1])

    # A restore at half the world size: sampled ranks read their rows of every tensor.
    restore = None
    if data:
        progress("restoring at half the world size")
        restore = await restore_half(
            url, prefix, shapes, world // 2 or 1, args.restore_ranks, counter
        )

    others = save_requests[1:] or save_requests
    save_puts = [r.puts for r in save_requests]
    total_puts = sum(save_puts) + commit_requests.puts
    result = {
        "ranks": world,
        "load_average": round(os.getloadavg()[0], 2),
        "tensors": args.tensors,
        "layout": layout,
        "data": data,
        "protocol": "gather-scatter" if linear else "all_gather",
        "index_entries": entries,
        "plan_s": round(plan_s + assign_s, 4),
        "merge_s": round(merge_s, 4),
        "commit_s": round(commit_s, 4),
        "plan_merge_commit_s": round(plan_s + assign_s + merge_s + commit_s, 4),
        "rank0_peak_mib": round(rank0_peak / MIB, 1),  # above the process's start
        "collective_bytes": sum(collectives.values()),
        "collectives": collectives,
        "index_bytes": index_bytes,
        "requests_per_rank": {
            "save": {
                "rank0_puts": save_puts[0] + commit_requests.puts,
                "rank0_gets": save_requests[0].gets + commit_requests.gets,
                "other_puts_max": max(r.puts for r in others),
                "other_gets_max": max(r.gets for r in others),
            },
            "restore_half": restore,
        },
        "s3_floor_s": {
            "save_puts_one_prefix": round(total_puts / S3_PUT_RATE, 3),
            "restore_gets_one_prefix": None
            if restore is None
            else round(restore["gets_max"] * (world // 2 or 1) / S3_GET_RATE, 3),
        },
    }
    return result


async def restore_half(
    url: str,
    prefix: str,
    shapes: list[tuple[str, tuple[int, ...]]],
    world: int,
    sample: int,
    counter: CountingStorage,
) -> dict[str, Any]:
    """Each sampled rank of ``world`` reads its rows of every tensor, as the library's
    restore does (``V2Reader.read_slices``: each data file's ranges in one coalesced read),
    and, for comparison, one tensor at a time (``read`` per tensor); requests per rank."""
    ranks = sorted({round(i * (world - 1) / max(sample - 1, 1)) for i in range(sample)})
    per_rank: list[Requests] = []
    per_tensor: list[Requests] = []
    storage, _ = Storage.from_url(url)
    fmt = get_format("v2")
    for rank in ranks:
        wanted = {name: even_slice(shape[0], rank, world) for name, shape in shapes}
        with counter.counting() as requests:
            reader = await fmt.open(storage, prefix)
            try:
                read_slices = getattr(reader, "read_slices", None)
                if read_slices is not None:
                    await read_slices(wanted, verify=False)
                else:  # a checkout before read_slices
                    for name, rows in wanted.items():
                        await reader.read(name, rows, verify=False)
            finally:
                await reader.aclose()
        per_rank.append(requests)
        with counter.counting() as requests:
            reader = await fmt.open(storage, prefix)
            try:
                for name, rows in wanted.items():
                    await reader.read(name, rows, verify=False)
            finally:
                await reader.aclose()
        per_tensor.append(requests)
    return {
        "world": world,
        "sampled_ranks": ranks,
        "gets_max": max(r.gets for r in per_rank),
        "bytes_max": max(r.get_bytes for r in per_rank),
        "coalesced_gets_max": max(coalesced(r.ranges) for r in per_rank),
        "per_tensor_gets_max": max(r.gets for r in per_tensor),
    }


def rank0_child(messages: str) -> int:
    """Rank 0's own work on what it receives; prints its peak RSS above its start, in bytes."""

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start = rss()
    with open(messages, "rb") as received:
        manifest_blobs, report_blob = pickle.load(received)
    manifests = [pickle.loads(blob) for blob in manifest_blobs]
    del manifest_blobs
    plan = plan_module.make_plan(manifests, ShardOptions())
    if hasattr(plan_module, "assign"):
        sent = [pickle.dumps(a) for a in plan_module.assign(plan, manifests)]
        del sent
    files = [f for per_rank in pickle.loads(report_blob) for f in per_rank]
    del report_blob
    build_index(plan.num_shards, files, plan.holders)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(max(peak - start, 0))
    return 0


def sweep(ranks: list[int], tensors: list[int], layout: str, timeout: float) -> list[Any]:
    """Each (ranks, tensors) pair, metadata only, in a process of its own."""
    results: list[Any] = []
    for t in tensors:
        for n in ranks:
            progress(f"sweep: {n} ranks x {t} tensors")
            cmd = [sys.executable, __file__, "--ranks", str(n), "--tensors", str(t)]
            cmd += ["--layout", layout, "--no-data", "--json"]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, check=True
                )
            except subprocess.TimeoutExpired:
                results.append({"ranks": n, "tensors": t, "layout": layout, "timeout_s": timeout})
                continue
            results.append(json.loads(proc.stdout))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--layout", choices=("fsdp", "tp", "replicated"), default="fsdp")
    parser.add_argument("--no-data", action="store_true", help="metadata only, write nothing")
    parser.add_argument("--rows-per-rank", type=int, default=1)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--restore-ranks", type=int, default=3)
    parser.add_argument("--dir", help="write the checkpoint here instead of to memory://")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--sweep", help="comma-separated rank counts: run each, metadata only")
    parser.add_argument("--sweep-tensors", default="100,1000", help="with --sweep")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per sweep point")
    parser.add_argument("--rank0-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank0_child:
        return rank0_child(args.rank0_child)
    if args.sweep:
        points = sweep(
            [int(n) for n in args.sweep.split(",")],
            [int(t) for t in args.sweep_tensors.split(",")],
            args.layout,
            args.timeout,
        )
        text = json.dumps(points, indent=2)
        if args.out:
            with open(args.out, "w") as out:
                out.write(text + "\n")
        print(
            text if args.json else f"{len(points)} points" + (f": {args.out}" if args.out else "")
        )
        return 0
    if args.ranks < 1 or args.tensors < 1:
        parser.error("--ranks and --tensors must be at least 1")
    result = asyncio.run(simulate(args))
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    if args.json:
        print(text)
    else:
        r = result
        print(
            f"{r['ranks']} ranks x {r['tensors']} tensors ({r['layout']}, {r['protocol']}): "
            f"{r['index_entries']:,} index entries; plan {r['plan_s']:.2f} s, merge "
            f"{r['merge_s']:.2f} s, commit {r['commit_s']:.2f} s; rank 0 peak "
            f"{r['rank0_peak_mib']:.0f} MiB; collectives {r['collective_bytes'] / MIB:,.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

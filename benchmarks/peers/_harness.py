"""What every measuring process shares: arguments, the state, cache control, timing and RSS.

A tool script (``anyckpt_tool.py``, ``limits.py``, ``tensorflow_peer.py``...) defines a
:class:`Tool` and calls :func:`main`. ``run.py`` starts one process per measurement:

    python benchmarks/peers/TOOL.py --workload W --scale S --op OP --dir D --meta META.json

and reads one JSON object from the last line of its standard output. Only NumPy (and
ml_dtypes) are needed here, so the module runs in every virtual environment.

Peak memory: the RSS high-water mark (``VmHWM``, i.e. ``ru_maxrss`` of this process's own
image, see :func:`peak_rss`) once the state exists, after resetting it with
``/proc/self/clear_refs`` so temporaries of building the state do not hide the operation's own
growth, subtracted from the high-water mark after the operation.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import workloads  # (benchmarks/ is put on the path above)

OBJECT = np.dtype(object)
SAVE_OPS = ("save_durable", "save", "async_save")
RESTORE_OPS = ("restore_warm", "restore_cold", "restore_subset")
OPS = SAVE_OPS + RESTORE_OPS


@dataclass
class Context:
    workload: str
    scale: float
    op: str
    dir: str
    meta: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return list(self.meta["keys"])

    @property
    def subset(self) -> list[str]:
        return list(self.meta["subset"])

    @property
    def dtypes(self) -> dict[str, str]:
        return dict(self.meta["dtypes"])


@dataclass
class Tool:
    """One tool's operations. Each callable gets the context (and the state for saves);
    ``restore``/``restore_subset`` return what they read (a mapping name -> array-like)."""

    name: str
    save: Callable[[Context, workloads.State, bool], None] | None = None
    restore: Callable[[Context], Mapping[str, Any]] | None = None
    restore_subset: Callable[[Context], Mapping[str, Any]] | None = None
    async_save: Callable[[Context, workloads.State], dict[str, float]] | None = None
    #: Turn the NumPy state into the tool's own objects (torch tensors...), untimed.
    convert: Callable[[workloads.State], Any] | None = None
    #: Whether the tool stores string tensors (if not, they are left out of its state).
    strings: bool = True
    #: Files the tool's checkpoint consists of, for warming and dropping caches.
    files: Callable[[Context], list[str]] | None = None
    #: A restored value as a NumPy array (for tools whose tensors are not array-likes).
    as_numpy: Callable[[Any], Any] | None = None
    #: Restores hand back lazily mapped tensors (safetensors maps the file): touch every
    #: page of the result before the clock stops, so that the data is really in memory.
    lazy: bool = False
    #: Untimed set-up before the operation, given the converted state for saves (None for
    #: restores); TensorFlow builds its graph here and runs the op once (kept in ctx.extra).
    prepare: Callable[[Context, Any], None] | None = None
    #: What a restore returned, as arrays, fetched after the clock stops (TensorFlow's
    #: variables live in its session).
    fetch: Callable[[Context, Mapping[str, Any]], Mapping[str, Any]] | None = None
    notes: str = ""


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes.

    ``VmHWM`` of /proc/self/status where there is one: the same high-water mark as
    ``getrusage(RUSAGE_SELF).ru_maxrss``, but of this process's own memory only. ru_maxrss
    also keeps the peak of the parent's image that was replaced at exec (the forked copy of
    run.py), which would hide any growth below it; ``clear_refs`` resets VmHWM only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def drop_caches() -> bool:
    """Write back and drop the page cache (needs root); False if not permitted, or if
    ANYCKPT_BENCH_NO_DROP is set (the CI smoke run: no need to evict other tests' files)."""
    os.sync()
    if os.environ.get("ANYCKPT_BENCH_NO_DROP"):
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def all_files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        out.extend(os.path.join(root, n) for n in names)
    return sorted(out)


def warm(paths: Iterable[str]) -> None:
    """Read files once so that they are in the page cache."""
    buf = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def prefault(nbytes: int) -> None:
    """Allocate, touch and free ``nbytes`` of anonymous memory (at most half of what is
    available), so that the timed operation's allocations find memory the machine has just
    used. On a virtual machine that hands freed guest memory back to its host, memory idle
    for a few seconds costs ~2 s per GiB of kernel time when first touched again (a 526 MiB
    buffer: 0.9-1.2 s cold, 0.05 s right after another): that is the host's cost, and it fell
    on whichever tool ran after one that maps files instead of allocating."""
    nbytes = min(nbytes, _available_bytes() // 2)
    if nbytes <= 0:
        return
    block = np.empty(nbytes, dtype=np.uint8)
    block[::4096] = 0
    del block


def fsync_tree(directory: str) -> None:
    """fsync every file under ``directory`` and the directories themselves."""
    for root, dirs, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        del dirs


def fresh_dir(directory: str) -> None:
    """An empty directory, with the deletion of what was there written back first."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.sync()


def count_read(result: Mapping[str, Any]) -> tuple[int, int]:
    """(tensors, payload bytes) of what a restore returned; strings counted by their bytes."""
    total = 0
    for value in result.values():
        if isinstance(value, (list, tuple)):
            total += sum(len(v) for v in value)
            continue
        array = np.asarray(value) if not hasattr(value, "nbytes") else value
        if getattr(array, "dtype", None) == OBJECT:
            total += sum(len(v) for v in np.asarray(array).reshape(-1).tolist())
        else:
            total += int(array.nbytes)
    return len(result), total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True, choices=workloads.WORKLOADS)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--op", required=True, choices=OPS)
    p.add_argument("--dir", required=True)
    p.add_argument("--meta", required=True, help="JSON written by run.py: keys, subset, dtypes")
    return p.parse_args(argv)


#: Scale of the untimed warm-up run (same workload shape, a few KiB to a few MiB).
WARMUP_SCALE = 0.001


def touch(result: Mapping[str, Any], tool: Tool) -> None:
    """Read one byte of every page of what a restore returned, inside the timed region: a
    tool that hands back lazily mapped tensors (safetensors maps the file) has then paid for
    bringing the data into memory, like one that reads it. Only for ``Tool.lazy`` tools:
    it costs a few microseconds per tensor, which would tax 10,000 small ones."""
    for value in result.values():
        if tool.as_numpy is not None:
            value = tool.as_numpy(value)
        if isinstance(value, (list, tuple)) or getattr(value, "dtype", None) == OBJECT:
            continue
        array = np.asarray(value)
        if array.dtype == object or array.nbytes == 0:
            continue
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        int(flat[::4096].sum())


def _state_for(tool: Tool, workload: str, scale: float) -> tuple[workloads.State, int, int]:
    state = workloads.build(workload, scale)
    if not tool.strings:
        state = {k: v for k, v in state.items() if not workloads.is_string(v)}
    return state, workloads.nbytes(state), len(state)


def _call(tool: Tool, op: str, ctx: Context, state: Any) -> Any:
    if op == "async_save":
        assert tool.async_save is not None
        return tool.async_save(ctx, state)
    if op in SAVE_OPS:
        assert tool.save is not None
        return tool.save(ctx, state, op == "save_durable")
    fn = tool.restore_subset if op == "restore_subset" else tool.restore
    assert fn is not None
    out = fn(ctx)
    if tool.lazy:
        touch(out, tool)
    return out


def warm_up(tool: Tool, args: argparse.Namespace) -> None:
    """One untimed run of the same operation on a tiny state of the same workload, in a
    scratch directory: imports, thread pools and first-call setup are then out of the way
    (a trainer saves and restores many times; the steady state is what counts)."""
    state, _, _ = _state_for(tool, args.workload, WARMUP_SCALE)
    scratch = args.dir.rstrip("/") + ".warmup"
    ctx = Context(args.workload, WARMUP_SCALE, args.op, scratch, workloads.describe(state))
    converted = tool.convert(state) if tool.convert is not None else state
    fresh_dir(scratch)
    try:
        if args.op in SAVE_OPS:
            _call(tool, args.op, ctx, converted)
        else:
            assert tool.save is not None
            tool.save(ctx, converted, False)
            if tool.prepare is not None:
                tool.prepare(ctx, None)
            _call(tool, args.op, ctx, None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(tool: Tool, args: argparse.Namespace) -> dict[str, Any]:
    with open(args.meta) as f:
        meta = json.load(f)
    ctx = Context(args.workload, args.scale, args.op, args.dir, meta)
    result: dict[str, Any] = {"tool": tool.name, "workload": args.workload, "op": args.op}
    op = args.op
    fn = {
        "async_save": tool.async_save,
        "restore_subset": tool.restore_subset,
        "restore_warm": tool.restore,
        "restore_cold": tool.restore,
    }.get(op, tool.save)
    if fn is None:
        return {**result, "skipped": f"{tool.name} has no {op}"}
    if op in SAVE_OPS:
        state, result["bytes"], result["tensors"] = _state_for(tool, args.workload, args.scale)
        if tool.convert is not None:
            state = tool.convert(state)
        warm_up(tool, args)
        fresh_dir(args.dir)
        if tool.prepare is not None:
            tool.prepare(ctx, state)
            fresh_dir(args.dir)
    else:
        if not os.path.isdir(args.dir) or not all_files(args.dir):
            return {**result, "skipped": f"no checkpoint of {tool.name} in {args.dir}"}
        state = None
        if tool.prepare is not None:
            tool.prepare(ctx, None)
        if op == "restore_cold":
            # Drop everything (the checkpoint's pages, inodes and directory entries), then
            # warm up so that the tool's own code and libraries are back in memory: what is
            # timed is the cold read of the checkpoint, not faulting in libtensorflow.
            result["cold"] = drop_caches()
            if not result["cold"]:
                result["note"] = "caches not dropped (not root, or --no-drop-caches): warm read"
            warm_up(tool, args)
        else:
            warm_up(tool, args)
            warm(tool.files(ctx) if tool.files else all_files(args.dir))
    if op in RESTORE_OPS:
        prefault(sum(os.path.getsize(p) for p in all_files(args.dir)))
    elif op == "async_save":
        prefault(result["bytes"])
    gc.collect()
    result["rss_reset"] = reset_peak()
    base = peak_rss()
    started = time.perf_counter()
    out = _call(tool, op, ctx, state)
    elapsed = time.perf_counter() - started
    result["rss_peak_delta"] = peak_rss() - base
    if op == "async_save":  # its own "seconds": the time the caller was blocked
        result.update(out)
    else:
        result["seconds"] = elapsed
    if op in SAVE_OPS:
        result["state_rss"] = base
        result["files_bytes"] = sum(os.path.getsize(p) for p in all_files(args.dir))
    else:
        if tool.fetch is not None:
            out = tool.fetch(ctx, out)
        result["tensors"], result["bytes"] = count_read(out)
    return result


def main(tool: Tool, argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        result = run(tool, args)
    except Exception as exc:  # reported, not raised: one failing peer must not stop the suite
        import traceback

        traceback.print_exc()
        result = {"tool": tool.name, "workload": args.workload, "op": args.op, "error": repr(exc)}
    if tool.notes:
        result.setdefault("notes", tool.notes)
    print(json.dumps(result), flush=True)

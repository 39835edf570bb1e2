"""How cost grows with the number of tensors (issue 18): save, full restore, 1% restore,
``keys()``, ``anyckpt inspect`` and ``anyckpt verify`` of 10^3 ... 10^6 tensors.

    .venv/bin/python benchmarks/scaling.py                          # 1e3, 1e4, 1e5 (a few minutes)
    .venv/bin/python benchmarks/scaling.py --counts 1000 10000 100000 1000000   # the long run
    .venv/bin/python benchmarks/run.py --scaling                    # the same, after the suite

Two tensor sizes: ``f256`` (256 float32, 1 KiB each) and ``b16`` (4 float32, 16 bytes each),
named like a deep model's variables. Every measurement is a fresh process (this file run with
``--worker``, in the tool's own virtual environment): it times one operation after an untimed
warm-up of the same operation on 100 tensors, and reports

* ``seconds`` and ``us_per_tensor``;
* ``peak_bytes``: the growth of the RSS high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the clock starts) during the operation;
* ``retained_bytes``: the RSS growth still there after it (what a restore returns: the
  arrays, their names and the dict), and ``overhead_per_tensor`` = (peak - retained) / tensors,
  the memory an operation needs beyond what it hands back (for a save, beyond the state).

Tools: ``anyckpt`` (V2); ``anyckpt-v1``, ``anyckpt-zstd`` and ``anyckpt-safetensors`` (the
same API and CLI with ``format="v1"``, or the two plugins' formats: plugins/anyckpt-zstd and
plugins/anyckpt-safetensors, not the safetensors library); ``limit`` (one ``readinto`` of
anyckpt's data file into one buffer: the raw read of the same bytes); and, in
``.venv-bench/peers`` when it exists (``run.py`` creates it), ``safetensors`` (its NumPy API)
and ``torch.save``. TensorFlow is left out: a graph of 10^5 variables takes minutes to build.
The checkpoints are written by each tool's ``save`` process and read warm (they were just
written). JSON: ``--out`` (default ``benchmarks/results/scaling-<time>.json``);
``benchmarks/plot_scaling.py`` draws it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))

from _harness import all_files, prefault  # noqa: E402

#: Tensor shapes (float32): the tensor-count runs use f256 and b16, the bytes runs m16.
KINDS: dict[str, tuple[int, ...]] = {"f256": (256,), "b16": (4,), "m16": (4 << 20,)}
OPS = ("save", "restore", "restore_subset", "keys", "inspect", "verify")
#: The bytes runs (``--bytes``): 16 MiB tensors, durable and page-cache saves, warm and cold
#: restores (caches dropped: needs root).
BYTES_OPS = ("save", "save_durable", "restore", "restore_cold")
#: The tools of the tensor-count runs and of the bytes runs, unless ``--tools`` says otherwise.
COUNT_TOOLS = ("anyckpt", "limit", "safetensors", "torch.save")
BYTES_TOOLS = ("anyckpt", "limit", "mmap", "dd")
#: anyckpt's formats other than V2 (issue 18, target 2): tool -> ``format=`` of ``anyckpt.save``
#: (the reads detect it). The plugins must be installed (``pip install -e plugins/...``) or on
#: ``PYTHONPATH`` with their entry points registered.
FORMAT_TOOLS = {"anyckpt-v1": "v1", "anyckpt-zstd": "zstd", "anyckpt-safetensors": "safetensors"}
TOOL_OPS: dict[str, tuple[str, ...]] = {
    "anyckpt": OPS + BYTES_OPS[1:],
    **dict.fromkeys(FORMAT_TOOLS, OPS),
    "limit": ("save", "save_durable", "restore", "restore_cold"),
    "mmap": ("restore", "restore_cold"),
    "dd": ("save_durable", "restore_cold"),
    "safetensors": ("save", "restore", "restore_subset", "keys"),
    "torch.save": ("save", "restore", "restore_subset", "keys"),
}
TOOL_VENV = {
    "anyckpt": "project",
    **dict.fromkeys(FORMAT_TOOLS, "project"),
    "limit": "project",
    "mmap": "project",
    "dd": "project",
    "safetensors": "peers",
    "torch.save": "peers",
}
#: Tools that read anyckpt's data file (no checkpoint of their own).
READS_ANYCKPT = ("mmap", "dd")
WARMUP = 100


def names(count: int) -> list[str]:
    """Names like a deep model's: 1,000 tensors per layer, in key order."""
    return [f"model/layer_{i // 1000:04d}/var_{i % 1000:03d}" for i in range(count)]


def build(count: int, kind: str) -> dict[str, np.ndarray]:
    """``count`` float32 tensors of ``KINDS[kind]``: rows of one random block (contiguous
    views: building 10^6 separate arrays would dominate the save process's set-up)."""
    shape = KINDS[kind]
    elems = int(np.prod(shape))
    rng = np.random.default_rng(count)
    block = rng.standard_normal((count, elems), dtype=np.float32)
    return {name: block[i].reshape(shape) for i, name in enumerate(names(count))}


def subset(keys: list[str]) -> list[str]:
    return keys[::100] or keys[:1]


# -- the measuring process --------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _drop_caches() -> bool:
    """As ``peers/_harness.drop_caches``: False if not root or ANYCKPT_BENCH_NO_DROP is set."""
    os.sync()
    if os.environ.get("ANYCKPT_BENCH_NO_DROP"):
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Anyckpt:
    """anyckpt's API and CLI; ``format`` as ``anyckpt.save`` takes it (reads detect it)."""

    def __init__(self, format: str = "v2") -> None:
        import anyio

        import anyckpt

        self.anyio, self.anyckpt, self.format = anyio, anyckpt, format

    def path(self, d: str) -> str:
        return os.path.join(d, "ckpt")

    def save(self, d: str, state: dict[str, np.ndarray], durable: bool = False) -> None:
        self.anyio.run(
            lambda: self.anyckpt.save(self.path(d), state, format=self.format, durable=durable)
        )

    def save_durable(self, d: str, state: dict[str, np.ndarray]) -> None:
        self.save(d, state, durable=True)

    def _load(self, d: str, keys: list[str] | None) -> Any:
        out: dict[str, Any] = {}

        async def go() -> None:  # the result handed out by a closure: see anyckpt_tool.py
            out["t"] = await self.anyckpt.load(self.path(d), keys)

        self.anyio.run(go)
        return out["t"]

    def restore(self, d: str) -> Any:
        return self._load(d, None)

    def restore_cold(self, d: str) -> Any:
        return self._load(d, None)

    def restore_subset(self, d: str, keys: list[str]) -> Any:
        return self._load(d, keys)

    def keys(self, d: str) -> Any:
        async def go() -> list[str]:
            async with self.anyckpt.open(self.path(d)) as reader:
                return reader.keys()

        return self.anyio.run(go)

    def _cli(self, *argv: str) -> int:
        from anyckpt.cli import main

        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return main(list(argv))

    def inspect(self, d: str) -> Any:
        return self._cli("inspect", self.path(d))

    def verify(self, d: str) -> Any:
        return self._cli("verify", self.path(d))


def _data_file(d: str) -> str:
    return os.path.join(d, "ckpt.data-00000-of-00001")


class _Limit:
    """The raw limits: ``ndarray.tofile`` of every tensor into one file (``fsync`` for the
    durable one), one ``readinto`` of anyckpt's data file into one buffer."""

    def save(self, d: str, state: dict[str, np.ndarray], durable: bool = False) -> None:
        with open(_data_file(d), "wb") as f:
            for value in state.values():
                value.tofile(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())

    def save_durable(self, d: str, state: dict[str, np.ndarray]) -> None:
        self.save(d, state, durable=True)

    def restore_cold(self, d: str) -> Any:
        return self.restore(d)

    def restore(self, d: str) -> Any:
        path = _data_file(d)
        buf = np.empty(os.path.getsize(path), dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buf)
            while view.nbytes:
                n = f.readinto(view)
                if not n:
                    raise OSError("short read")
                view = view[n:]
        return buf


class _Mmap:
    """Mapped reads of anyckpt's data file: each 16 MiB tensor copied from a read-only
    mapping into a fresh array (no checksum), the alternative to ``pread`` for a cold read."""

    def restore(self, d: str) -> Any:
        import mmap

        size = os.path.getsize(_data_file(d))
        chunk = KINDS["m16"][0] * 4
        with open(_data_file(d), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            with contextlib.suppress(AttributeError, OSError):
                m.madvise(mmap.MADV_SEQUENTIAL)
            view = np.frombuffer(m, dtype=np.uint8)
            out = [view[at : at + chunk].copy() for at in range(0, size, chunk)]
            del view
        return out

    restore_cold = restore


class _Dd:
    def save_durable(self, d: str, state: dict[str, np.ndarray]) -> None:
        nbytes = sum(v.nbytes for v in state.values())
        subprocess.run(
            [
                "dd",
                "if=/dev/zero",
                f"of={os.path.join(d, 'dd.bin')}",
                "bs=16M",
                f"count={nbytes}",
                "iflag=count_bytes",
                "conv=fsync",
            ],
            check=True,
            capture_output=True,
        )

    def restore_cold(self, d: str) -> Any:
        subprocess.run(
            ["dd", f"if={_data_file(d)}", "of=/dev/null", "bs=16M"], check=True, capture_output=True
        )
        return None


class _Safetensors:
    def __init__(self) -> None:
        import safetensors.numpy

        self.st = safetensors.numpy
        from safetensors import safe_open

        self.safe_open = safe_open

    def path(self, d: str) -> str:
        return os.path.join(d, "model.safetensors")

    def save(self, d: str, state: dict[str, np.ndarray]) -> None:
        self.st.save_file(state, self.path(d))

    def restore(self, d: str) -> Any:
        return self.st.load_file(self.path(d))

    def restore_subset(self, d: str, keys: list[str]) -> Any:
        with self.safe_open(self.path(d), "np") as f:
            return {k: f.get_tensor(k) for k in keys}

    def keys(self, d: str) -> Any:
        with self.safe_open(self.path(d), "np") as f:
            return list(f.keys())


class _Torch:
    def __init__(self) -> None:
        import torch

        self.torch = torch

    def path(self, d: str) -> str:
        return os.path.join(d, "model.pt")

    def convert(self, state: dict[str, np.ndarray]) -> Any:
        return {k: self.torch.from_numpy(v.copy()) for k, v in state.items()}

    def save(self, d: str, state: Any) -> None:
        self.torch.save(state, self.path(d))

    def restore(self, d: str) -> Any:
        return self.torch.load(self.path(d))

    def restore_subset(self, d: str, keys: list[str]) -> Any:
        mapped = self.torch.load(self.path(d), mmap=True)
        return {k: mapped[k].clone() for k in keys}

    def keys(self, d: str) -> Any:
        return list(self.torch.load(self.path(d), mmap=True).keys())


def _tool(name: str) -> Any:
    if name in FORMAT_TOOLS:
        return _Anyckpt(FORMAT_TOOLS[name])
    tools = {"anyckpt": _Anyckpt, "limit": _Limit, "mmap": _Mmap, "dd": _Dd}
    return {**tools, "safetensors": _Safetensors, "torch.save": _Torch}[name]()


def _call(tool: Any, op: str, d: str, count: int, state: Any) -> Any:
    if op in ("save", "save_durable"):
        return getattr(tool, op)(d, state)
    if op == "restore_subset":
        return tool.restore_subset(d, subset(names(count)))
    fn: Callable[[str], Any] = getattr(tool, op)
    return fn(d)


def _check(op: str, count: int, out: Any) -> str | None:
    """What is wrong with what a read returned (None: all there)."""
    want = {"restore": count, "restore_subset": len(subset(names(count))), "keys": count}.get(op)
    if op in ("inspect", "verify"):
        return None if out == 0 else f"exit status {out}"
    if want is None or out is None or isinstance(out, np.ndarray):
        return None
    return None if len(out) == want else f"{len(out)} items, expected {want}"


def worker(args: argparse.Namespace) -> dict[str, Any]:
    tool = _tool(args.tool)
    count, kind, d = args.count, args.kind, args.dir
    warm = d.rstrip("/") + ".warmup"
    shutil.rmtree(warm, ignore_errors=True)
    os.makedirs(warm)
    small = build(WARMUP, kind)
    convert = getattr(tool, "convert", None)
    if args.tool == "limit" and args.op.startswith("restore"):
        _Anyckpt().save(warm, small)  # reads anyckpt's data file: one of its own
        tool.restore(warm)
    elif hasattr(tool, "save"):
        tool.save(warm, convert(small) if convert else small)
        _call(tool, args.op, warm, WARMUP, convert(small) if convert else small)
    shutil.rmtree(warm, ignore_errors=True)
    state = None
    cold = None
    if args.op.endswith("_cold"):
        cold = _drop_caches()
    if args.op.startswith("save"):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        state = build(count, kind)
        if convert:
            state = convert(state)
    if not args.op.startswith("save"):  # (a save's state is built, so touched, above)
        # Memory the timed read may take: ~512 B per tensor of arrays, names and dict, and the
        # files' bytes (peers/_harness.prefault says why).
        prefault(count * 512 + sum(os.path.getsize(p) for p in all_files(d)))
    _reset_peak()
    base = _status("VmRSS")
    started = time.perf_counter()
    out = _call(tool, args.op, d, count, state)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM") - base
    retained = max(_status("VmRSS") - base, 0) if args.op != "save" else 0
    result = {
        "tool": args.tool,
        "op": args.op,
        "count": count,
        "kind": kind,
        "seconds": seconds,
        "us_per_tensor": 1e6 * seconds / count,
        "peak_bytes": peak,
        "retained_bytes": retained,
        "overhead_per_tensor": max(peak - retained, 0) / count,
    }
    if cold is not None:
        result["cold"] = cold
    if args.op.startswith("save") or args.kind == "m16":
        result["bytes"] = count * int(np.prod(KINDS[kind])) * 4
        result["mib_per_s"] = result["bytes"] / 2**20 / seconds
    if args.op.startswith("save") and isinstance(tool, _Anyckpt):
        result["files"] = sorted(os.listdir(d))  # which format wrote them
    problem = _check(args.op, count, out)
    if problem:
        result["error"] = problem
    return result


# -- the orchestrator -------------------------------------------------------------------------


def pythons() -> dict[str, str]:
    out = {"project": sys.executable}
    peers = os.path.join(ROOT, ".venv-bench", "peers", "bin", "python")
    if os.path.exists(peers):
        out["peers"] = peers
    return out


def run_one(
    python: str, tool: str, op: str, count: int, kind: str, d: str, timeout: float
) -> dict[str, Any]:
    cmd = [python, os.path.abspath(__file__), "--worker", "--tool", tool, "--op", op]
    cmd += ["--count", str(count), "--kind", kind, "--dir", d]
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    base = {"tool": tool, "op": op, "count": count, "kind": kind}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {**base, "error": tail[-300:]}
    result: dict[str, Any] = {**base, **json.loads(lines[-1])}  # an error names its point too
    return result


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[-1])
    ok.sort(key=lambda r: r["seconds"])
    out = dict(ok[len(ok) // 2])
    out["runs"] = len(ok)
    out["seconds_all"] = [r["seconds"] for r in ok]
    out["peak_bytes"] = max(r["peak_bytes"] for r in ok)
    out["overhead_per_tensor"] = max(r["overhead_per_tensor"] for r in ok)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    pys = pythons()
    tools = [t for t in args.tools if TOOL_VENV[t] in pys]
    skipped = {t: "no .venv-bench/peers (run.py creates it)" for t in args.tools if t not in tools}
    work = os.path.abspath(args.work_dir)
    points: list[dict[str, Any]] = []
    try:
        for kind in args.kinds:
            for count in args.counts:
                for tool in tools:
                    d = os.path.join(work, f"{tool}-{kind}-{count}")
                    source = os.path.join(work, f"anyckpt-{kind}-{count}")
                    for op in args.ops:
                        if op not in TOOL_OPS[tool]:
                            continue
                        runs = []
                        for _ in range(args.runs if count <= args.repeat_below else 1):
                            reads = tool in READS_ANYCKPT or (
                                tool == "limit" and op.startswith("restore")
                            )
                            where = source if reads else d
                            py = pys[TOOL_VENV[tool]]
                            runs.append(run_one(py, tool, op, count, kind, where, args.timeout))
                        point = median_of(runs)
                        points.append(point)
                        _log(point, args.quiet)
                    if tool != "anyckpt":
                        shutil.rmtree(d, ignore_errors=True)
                shutil.rmtree(os.path.join(work, f"anyckpt-{kind}-{count}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": {"nproc": os.cpu_count(), "load_after": os.getloadavg()[0]},
        "kinds": {k: {"shape": list(v), "bytes": int(np.prod(v)) * 4} for k, v in KINDS.items()},
        "skipped": skipped,
        "points": points,
    }


def _log(point: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    if "error" in point:
        text = point["error"]
    else:
        text = (
            f"{point['seconds']:8.3f} s  {point['us_per_tensor']:7.2f} us/tensor  "
            f"peak +{point['peak_bytes'] / 2**20:7.1f} MiB  "
            f"beyond result {point['overhead_per_tensor']:6.0f} B/tensor"
        )
    print(
        f"{point['kind']:5} {point['count']:>8} {point['tool']:12} {point['op']:15} {text}",
        file=sys.stderr,
        flush=True,
    )


def table(summary: dict[str, Any]) -> str:
    """Markdown: per kind and op, us/tensor and overhead bytes/tensor for each count."""
    lines = []
    points = summary["points"]
    counts = sorted({p["count"] for p in points})
    for kind in sorted({p["kind"] for p in points}):
        lines += [f"#### {kind}: µs per tensor (bytes per tensor beyond the result)", ""]
        lines.append("| tool | operation | " + " | ".join(f"{c:,}" for c in counts) + " |")
        lines.append("|---|---|" + "---|" * len(counts))
        rows: dict[tuple[str, str], dict[int, str]] = {}
        for p in points:
            if p["kind"] != kind:
                continue
            cell = (
                p["error"][:40]
                if "error" in p
                else f"{p['us_per_tensor']:.2f} ({p['overhead_per_tensor']:.0f})"
            )
            rows.setdefault((p["tool"], p["op"]), {})[p["count"]] = cell
        for (tool, op), cells in rows.items():
            lines.append(
                f"| {tool} | {op} | " + " | ".join(cells.get(c, "") for c in counts) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--counts", nargs="+", type=int, default=[1000, 10_000, 100_000])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument(
        "--ops", nargs="+", choices=OPS + BYTES_OPS[1:], help=f"default: {' '.join(OPS)}"
    )
    p.add_argument(
        "--tools",
        nargs="+",
        choices=list(TOOL_OPS),
        help=f"default: {' '.join(COUNT_TOOLS)} ({' '.join(BYTES_TOOLS)} with --bytes)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per point (median) below ...")
    p.add_argument("--repeat-below", type=int, default=100_000, help="... this many tensors")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--work-dir", default=os.path.join(HERE, "results", "scaling-work"))
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--bytes",
        action="store_true",
        help="the bytes runs instead: --sizes MiB of 16 MiB tensors, saved and restored by "
        "anyckpt, the raw limits, mapped reads and dd",
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 1024, 2048], help="MiB")
    # the measuring process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bytes and not args.worker:
        args.counts = [max(1, mib // 16) for mib in args.sizes]
        args.kinds = ["m16"]
        args.ops = [op for op in BYTES_OPS if op in (args.ops or BYTES_OPS)]
        args.tools = [t for t in BYTES_TOOLS if t in (args.tools or BYTES_TOOLS)]
    else:
        args.ops = args.ops or list(OPS)
        args.tools = args.tools or list(COUNT_TOOLS)
    if args.worker:
        try:
            result = worker(args)
        except Exception as exc:  # reported, not raised: one failing point must not stop the run
            import traceback

            traceback.print_exc()
            result = {"tool": args.tool, "op": args.op, "error": repr(exc)[:300]}
        print(json.dumps(result), flush=True)
        return 0
    summary = measure(args)
    out = args.out or os.path.join(
        HERE, "results", f"scaling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    text = table(summary)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark suite, one command: anyckpt against the physical limits and its peers.

    .venv/bin/python benchmarks/run.py                # everything, 3 runs, full size
    .venv/bin/python benchmarks/run.py --scale 0.01 --runs 1 --no-venvs   # quick, in-process peers

Every measurement is a fresh process (``benchmarks/peers/*.py``) in the tool's own virtual
environment, so peak RSS is clean and the peers' imports never meet: anyckpt, the Python limits
and numpy.savez in the project's ``.venv``; TensorFlow in ``.venv-tf``; torch, safetensors and
torch.distributed.checkpoint in ``.venv-bench/peers``; Orbax in ``.venv-bench/orbax`` (the
``.venv-bench`` ones are created here on first use). ``dd`` gives the durable-write and
cold-read limits. Last, ``benchmarks/sharded_save_s3.py`` (a process of its own) measures a
sharded save to the S3 test server (moto, started on 127.0.0.1 and stopped there) against one
sequential upload of the same bytes: 1 GiB × ``--scale`` (``--no-s3`` leaves it out, as does
a run narrowed by ``--ops`` or ``--tools`` unless ``--s3`` is given).
Results: a Markdown table on stdout, and JSON + Markdown in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
sys.path.insert(0, HERE)
sys.path.insert(0, PEERS)

import sharded_save_s3  # noqa: E402
import workloads  # noqa: E402
from _harness import drop_caches  # noqa: E402

OPS = ("save_durable", "save", "async_save", "restore_warm", "restore_cold", "restore_subset")
OP_TITLES = {
    "save_durable": "save, durable (fsync)",
    "save": "save, page cache",
    "async_save": "async save: time blocked",
    "restore_warm": "restore, warm cache",
    "restore_cold": "restore, cold cache",
    "restore_subset": "restore 1% of keys (warm)",
}
MiB = 1 << 20
#: A restore may use this much memory beyond what it returns; a save beyond its state (and the
#: capture copy, for the manager's async save).
MEMORY_SLACK = 64 * MiB


@dataclass
class Venv:
    path: str
    packages: tuple[str, ...]

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")


BENCH_VENVS = {
    "peers": Venv(
        os.path.join(ROOT, ".venv-bench", "peers"),
        ("numpy", "ml_dtypes", "safetensors", "torch==2.13.0", "py-spy", "pyinstrument"),
    ),
    "orbax": Venv(os.path.join(ROOT, ".venv-bench", "orbax"), ("orbax-checkpoint", "ml_dtypes")),
}


@dataclass
class ToolSpec:
    name: str
    script: str
    venv: str  # "project", "tf", or a key of BENCH_VENVS
    ops: tuple[str, ...]
    in_process: bool = False  # runs in the project venv (the CI smoke run uses only these)


TOOLS = [
    ToolSpec("anyckpt", "anyckpt_tool.py", "project", OPS, True),
    ToolSpec("limit", "limits.py", "project", ("save", "async_save", "restore_warm"), True),
    ToolSpec("tensorflow", "tensorflow_peer.py", "tf", OPS[:2] + OPS[3:]),
    ToolSpec("torch.save", "torch_peer.py", "peers", OPS[:2] + OPS[3:]),
    ToolSpec("safetensors", "safetensors_peer.py", "peers", OPS[:2] + OPS[3:]),
    ToolSpec("numpy.savez", "numpy_peer.py", "project", OPS[:2] + OPS[3:], True),
    ToolSpec("torch.dcp", "torch_dcp_peer.py", "peers", OPS),
    ToolSpec("orbax", "orbax_peer.py", "orbax", OPS[:5]),
]
PEER_NAMES = [t.name for t in TOOLS if t.name not in ("anyckpt", "limit")]
# dd is not a Python tool: run.py runs it for the durable-write and cold-read limits.
DD = "dd"


@dataclass
class Cell:
    runs: list[dict[str, Any]] = field(default_factory=list)

    def ok_runs(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if "seconds" in r and "error" not in r]

    def problem(self) -> str | None:
        for r in self.runs:
            if "error" in r:
                return f"error: {r['error']}"
            if "skipped" in r:
                return str(r["skipped"])
        return None


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# -- environments ----------------------------------------------------------------------------


def bench_env() -> dict[str, str]:
    """The environment of every measuring process. OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are set
    on some of these machines for old OpenBLAS builds and slow a current NumPy: unset both."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def ensure_venv(venv: Venv, quiet: bool) -> str | None:
    """Create the venv and install its packages once; return why it failed (None if fine)."""
    marker = os.path.join(venv.path, ".installed")
    wanted = "\n".join(venv.packages)
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == wanted:
                return None
    log(f"setting up {venv.path}: pip install {' '.join(venv.packages)}", quiet)
    try:
        subprocess.run([sys.executable, "-m", "venv", venv.path], check=True, capture_output=True)
        proc = subprocess.run(
            [venv.python, "-m", "pip", "install", "--quiet", *venv.packages],
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"could not create the venv: {exc}"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        return "does not install here: " + (lines[-1] if lines else f"pip exit {proc.returncode}")
    with open(marker, "w") as f:
        f.write(wanted)
    return None


def resolve_pythons(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """Python executable per venv key, and why a venv is unavailable."""
    pythons: dict[str, str] = {"project": sys.executable}
    missing: dict[str, str] = {}
    if args.no_venvs:
        for key in ("tf", *BENCH_VENVS):
            missing[key] = "not run (--no-venvs)"
        return pythons, missing
    tf_python = os.environ.get("ANYCKPT_TF_PYTHON") or os.path.join(
        ROOT, ".venv-tf", "bin", "python"
    )
    if os.path.exists(tf_python):
        pythons["tf"] = tf_python
    else:
        missing["tf"] = "no TensorFlow venv (.venv-tf: `make test` creates it)"
    for key, venv in BENCH_VENVS.items():
        problem = ensure_venv(venv, args.quiet)
        if problem:
            missing[key] = problem
        else:
            pythons[key] = venv.python
    return pythons, missing


# -- measuring -------------------------------------------------------------------------------


#: The 1-minute load average before every measurement: how busy the machine was.
LOAD_SAMPLES: list[float] = []


def run_tool(
    python: str, tool: ToolSpec, workload: str, op: str, directory: str, meta: str, args: Any
) -> dict[str, Any]:
    LOAD_SAMPLES.append(os.getloadavg()[0])
    cmd = [python, os.path.join(PEERS, tool.script), "--workload", workload, "--scale"]
    cmd += [repr(args.scale), "--op", op, "--dir", directory, "--meta", meta]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=bench_env(), timeout=args.timeout, cwd=PEERS
        )
    except subprocess.TimeoutExpired:
        return {"tool": tool.name, "op": op, "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"tool": tool.name, "op": op, "error": tail[-300:]}
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        result["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
    return result


_DD_SECONDS = re.compile(r"copied, ([0-9.]+) s")


def _dd(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    match = _DD_SECONDS.search(proc.stderr)
    return float(match.group(1)) if match else wall


def run_dd(nbytes: int, directory: str, op: str) -> dict[str, Any]:
    """dd of ``nbytes``: a durable write (conv=fsync), or a read after dropping caches."""
    if shutil.which("dd") is None:
        return {"tool": DD, "op": op, "skipped": "no dd"}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "dd.bin")
    count = ["bs=16M", f"count={nbytes}", "iflag=count_bytes"]
    if op == "save_durable":
        if os.path.exists(path):
            os.unlink(path)
        os.sync()
        seconds = _dd(["dd", "if=/dev/zero", f"of={path}", *count, "conv=fsync"])
        return {"tool": DD, "op": op, "seconds": seconds, "bytes": nbytes}
    if not os.path.exists(path) or os.path.getsize(path) != nbytes:
        _dd(["dd", "if=/dev/zero", f"of={path}", *count, "conv=fsync"])
    cold = drop_caches()
    seconds = _dd(["dd", f"if={path}", "of=/dev/null", "bs=16M"])
    out: dict[str, Any] = {"tool": DD, "op": op, "seconds": seconds, "bytes": nbytes, "cold": cold}
    if not cold:
        out["note"] = "could not drop caches: a warm read"
    return out


def write_meta(workload: str, scale: float, path: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"workload": workload, "scale": scale}
    meta.update(workloads.describe(workloads.build(workload, scale)))
    with open(path, "w") as f:
        json.dump(meta, f)
    return meta


def expected_read(meta: dict[str, Any], tool: str, op: str) -> tuple[int, int]:
    """(tensors, bytes) a restore must return; tools without strings skip the string tensors."""
    no_strings = tool in ("safetensors", "orbax")
    keys = meta["subset"] if op == "restore_subset" else meta["keys"]
    if no_strings:
        keys = [k for k in keys if meta["dtypes"][k] != "string"]
    if op == "restore_subset":
        nbytes = meta["subset_numeric_bytes"] if no_strings else meta["subset_bytes"]
    else:
        nbytes = meta["numeric_bytes"] if no_strings else meta["bytes"]
    return len(keys), nbytes


# -- the run ---------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    pythons, missing = resolve_pythons(args)
    tools = [t for t in TOOLS if t.name in args.tools]
    work = os.path.abspath(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cells: dict[str, dict[str, dict[str, Cell]]] = {}
    metas: dict[str, dict[str, Any]] = {}
    unavailable = {t.name: missing[t.venv] for t in TOOLS if t.venv in missing}
    try:
        for wl in args.workloads:
            meta_path = os.path.join(work, f"{wl}.meta.json")
            meta = write_meta(wl, args.scale, meta_path)
            metas[wl] = {k: v for k, v in meta.items() if k not in ("keys", "dtypes", "shapes")}
            metas[wl]["subset"] = len(meta["subset"])
            log(f"== {wl}: {meta['tensors']} tensors, {meta['bytes'] / MiB:.1f} MiB", args.quiet)
            cells[wl] = {op: {} for op in args.ops}
            for op in args.ops:
                for rep in range(args.runs):
                    if op in ("save_durable", "restore_cold") and DD in args.tools:
                        r = run_dd(meta["bytes"], os.path.join(work, wl, "dd"), op)
                        cells[wl][op].setdefault(DD, Cell()).runs.append(r)
                        log(f"   {op:15} {DD:12} run {rep + 1}: {_brief(r)}", args.quiet)
                    for tool in tools:
                        if op not in tool.ops:
                            continue
                        if tool.name in unavailable:
                            cell = cells[wl][op].setdefault(tool.name, Cell())
                            if not cell.runs:
                                cell.runs.append({"skipped": unavailable[tool.name]})
                            continue
                        suffix = "-async" if op == "async_save" else ""
                        directory = os.path.join(work, wl, tool.name + suffix)
                        r = run_tool(pythons[tool.venv], tool, wl, op, directory, meta_path, args)
                        if op.startswith("restore") and "seconds" in r:
                            want = expected_read(meta, tool.name, op)
                            got = (r.get("tensors"), r.get("bytes"))
                            if tool.name == "limit":  # one buffer of the same bytes
                                want, got = want[1:], got[1:]
                            r["check"] = "ok" if got == want else f"read {got}, expected {want}"
                        cells[wl][op].setdefault(tool.name, Cell()).runs.append(r)
                        log(f"   {op:15} {tool.name:12} run {rep + 1}: {_brief(r)}", args.quiet)
            if not args.keep:
                shutil.rmtree(os.path.join(work, wl), ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return summarize(cells, metas, unavailable, args)


def _brief(r: dict[str, Any]) -> str:
    if "seconds" in r:
        extra = f" rss+{r.get('rss_peak_delta', 0) / MiB:.0f}MiB" if "rss_peak_delta" in r else ""
        check = f" [{r['check']}]" if r.get("check", "ok") != "ok" else ""
        return f"{r['seconds']:.4f} s{extra}{check}"
    return str(r.get("error") or r.get("skipped"))


def summarize(
    cells: dict[str, dict[str, dict[str, Cell]]],
    metas: dict[str, dict[str, Any]],
    unavailable: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for wl, by_op in cells.items():
        results[wl] = {}
        for op, by_tool in by_op.items():
            results[wl][op] = {}
            for tool, cell in by_tool.items():
                ok = cell.ok_runs()
                entry: dict[str, Any] = {"runs": cell.runs}
                if ok:
                    secs = [r["seconds"] for r in ok]
                    med = statistics.median(secs)
                    nbytes = ok[0].get("bytes", metas[wl]["bytes"])
                    entry.update(
                        median_s=med,
                        min_s=min(secs),
                        max_s=max(secs),
                        spread_pct=100 * (max(secs) - min(secs)) / med if med else 0.0,
                        bytes=nbytes,
                        mib_per_s=nbytes / MiB / med if med else math.inf,
                    )
                    rss = [r["rss_peak_delta"] for r in ok if "rss_peak_delta" in r]
                    if rss:
                        entry["rss_peak_delta_median"] = statistics.median(rss)
                        entry["rss_peak_delta_max"] = max(rss)
                    checks = {r["check"] for r in ok if "check" in r}
                    if checks - {"ok"}:
                        entry["check"] = sorted(checks - {"ok"})
                    if any(r.get("cold") is False for r in ok):
                        entry["note"] = "caches could not be dropped: warm"
                    for k in ("total_seconds", "capture_seconds", "write_seconds"):
                        vals = [r[k] for r in ok if k in r]
                        if vals:
                            entry[f"{k}_median"] = statistics.median(vals)
                else:
                    entry["problem"] = cell.problem() or "no result"
                results[wl][op][tool] = entry
    ratios = compute_ratios(results)
    return {
        "machine": machine_info(),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "scale": args.scale,
        "runs": args.runs,
        "workloads": metas,
        "unavailable": unavailable,
        "results": results,
        "ratios": ratios,
        "targets": evaluate_targets(results, metas),
    }


LIMIT_OF = {
    "save_durable": DD,
    "save": "limit",
    "restore_warm": "limit",
    "restore_cold": DD,
    "async_save": "limit",
}
LIMIT_NAMES = {
    "save_durable": "dd conv=fsync",
    "save": "ndarray.tofile",
    "restore_warm": "readinto",
    "restore_cold": "dd read (cold)",
    "async_save": "numpy.copy",
}


def _speed(results: dict[str, Any], wl: str, op: str, tool: str) -> float | None:
    entry = results.get(wl, {}).get(op, {}).get(tool, {})
    value = entry.get("mib_per_s")
    return float(value) if value is not None else None


def compute_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """anyckpt's throughput ÷ the limit's and ÷ each peer's (> 1: anyckpt is faster). For the
    async save, throughput is bytes ÷ time blocked, so the ratio is copy time ÷ blocked time."""
    out: dict[str, Any] = {}
    for wl, by_op in results.items():
        out[wl] = {}
        for op in by_op:
            mine = _speed(results, wl, op, "anyckpt")
            row: dict[str, float | None] = {}
            limit = LIMIT_OF.get(op)
            if limit:
                other = _speed(results, wl, op, limit)
                row["limit"] = mine / other if mine and other else None
            for peer in PEER_NAMES:
                other = _speed(results, wl, op, peer)
                if other is not None:
                    row[peer] = mine / other if mine else None
            out[wl][op] = row
    return out


#: Shards of the S3 measurement (the target: a sharded save ≥ 2 × one sequential upload).
S3_SHARDS = 4


def run_s3(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks/sharded_save_s3.py`` in a process of its own: its figures, or a problem."""
    out = os.path.join(os.path.abspath(args.work_dir) + "-s3.json")
    cmd = [sys.executable, os.path.join(HERE, "sharded_save_s3.py"), "--quiet", "--json", out]
    cmd += ["--gib", str(args.scale), "--shards", str(S3_SHARDS), "--repeat", str(args.runs)]
    log(f"== S3 test server: {args.scale:g} GiB, {S3_SHARDS} shards", args.quiet)
    LOAD_SAMPLES.append(os.getloadavg()[0])
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=bench_env(), cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"problem": f"timed out after {args.timeout:.0f} s"}
    try:
        if proc.returncode != 0:
            return {"problem": f"exit status {proc.returncode}: {proc.stderr.strip()[-800:]}"}
        with open(out) as f:
            figures: dict[str, Any] = json.load(f)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    for name, entry in figures["cases"].items():
        log(f"   {name:18} median {entry['median_s']:.2f} s", args.quiet)
    return figures


def evaluate_targets(
    results: dict[str, Any], metas: dict[str, Any], s3: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, higher: bool, detail: str) -> None:
        if value is None:
            targets.append({"target": name, "met": None, "detail": "not measured: " + detail})
            return
        met = value >= goal if higher else value <= goal
        targets.append({"target": name, "met": met, "value": value, "goal": goal, "detail": detail})

    def ratio(wl: str, op: str, other: str) -> float | None:
        mine, theirs = _speed(results, wl, op, "anyckpt"), _speed(results, wl, op, other)
        return mine / theirs if mine and theirs else None

    for op, goal_text in (
        ("save_durable", "durable save of large ≥ 0.9 × dd conv=fsync"),
        ("save", "page-cache save of large ≥ 0.9 × ndarray.tofile"),
        ("restore_warm", "warm restore of large ≥ 0.9 × readinto"),
        ("restore_cold", "cold restore of large ≥ 0.9 × dd read"),
    ):
        add(goal_text, ratio("large", op, LIMIT_OF[op]), 0.9, True, "throughput ratio")
    for op in ("save", "save_durable", "restore_warm", "restore_cold"):
        add(
            f"many_small {OP_TITLES[op]} faster than TensorFlow",
            ratio("many_small", op, "tensorflow"),
            1.0,
            True,
            "throughput ratio, > 1 is faster",
        )
    for wl in results:
        mine = results[wl].get("async_save", {}).get("anyckpt", {}).get("median_s")
        copy = results[wl].get("async_save", {}).get("limit", {}).get("median_s")
        add(
            f"{wl}: async save() blocks ≤ 1.2 × numpy.copy",
            mine / copy if mine is not None and copy else None,
            1.2,
            False,
            "time ratio",
        )
    for wl in results:
        state = metas[wl]["bytes"]
        for op in ("save_durable", "save", "async_save"):
            entry = results[wl].get(op, {}).get("anyckpt", {})
            budget = MEMORY_SLACK + (state if op == "async_save" else 0)
            peak = entry.get("rss_peak_delta_max")
            add(
                f"{wl}: peak RSS of {OP_TITLES[op]} ≤ "
                + ("state + capture copy + 64 MiB" if op == "async_save" else "state + 64 MiB"),
                None if peak is None else peak / MiB,
                budget / MiB,
                False,
                "MiB above the state",
            )
        for op in ("restore_warm", "restore_cold", "restore_subset"):
            entry = results[wl].get(op, {}).get("anyckpt", {})
            peak = entry.get("rss_peak_delta_max")
            restored = entry.get("bytes", 0)
            add(
                f"{wl}: peak RSS of {OP_TITLES[op]} ≤ restored state + 64 MiB",
                None if peak is None else peak / MiB,
                (restored + MEMORY_SLACK) / MiB,
                False,
                "MiB above the baseline",
            )
    if s3 is not None:
        sharded = s3.get("cases", {}).get(f"anyckpt shards={S3_SHARDS}")
        unsigned = s3.get("cases", {}).get(f"anyckpt shards={S3_SHARDS} unsigned")
        detail = "time ratio of the medians"
        if unsigned:
            detail += f"; without payload signing {unsigned['x_sequential_median']:.2f}"
        add(
            f"to the S3 test server, a sharded save ({S3_SHARDS} shards) ≥ 2 × one sequential "
            "upload",
            None if sharded is None else sharded["x_sequential_median"],
            2.0,
            True,
            detail if sharded else s3.get("problem", "no figures"),
        )
    return targets


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        st = os.statvfs(ROOT)
        info["disk_free_gib"] = round(st.f_bavail * st.f_frsize / (1 << 30), 1)
        mounts = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", ROOT],
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["disk"] = mounts
    except OSError:
        pass
    return info


# -- reporting -------------------------------------------------------------------------------


def _fmt_speed(entry: dict[str, Any]) -> str:
    if "mib_per_s" not in entry:
        return "—"
    speed = entry["mib_per_s"]
    text = f"{speed:,.0f}" if speed >= 100 else f"{speed:,.1f}"
    return f"{text} ±{entry['spread_pct']:.0f}%"


def render(summary: dict[str, Any]) -> str:
    results, ratios = summary["results"], summary["ratios"]
    lines: list[str] = []
    load = summary["machine"].get("load_1min_during")
    if load:
        lines.append(
            f"Load average (1 min) before each measurement: min {load['min']:.2f}, "
            f"median {load['median']:.2f}, max {load['max']:.2f} (2 cores)."
        )
        lines.append("")
    tools = [DD, "limit", "anyckpt", *PEER_NAMES]
    for wl, by_op in results.items():
        meta = summary["workloads"][wl]
        present = [t for t in tools if any(t in by_op[op] for op in by_op)]
        lines.append(
            f"### {wl}: {meta['tensors']} tensors, {meta['bytes'] / MiB:,.1f} MiB "
            f"(median MiB/s of {summary['runs']} runs ± spread; async save: MiB ÷ time blocked)"
        )
        lines.append("")
        lines.append("| operation | " + " | ".join(present) + " |")
        lines.append("|---|" + "---|" * len(present))
        for op, by_tool in by_op.items():
            cells = [_fmt_speed(by_tool.get(t, {})) for t in present]
            lines.append(f"| {OP_TITLES[op]} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Peak RSS above the baseline (MiB, max of runs):")
        lines.append("")
        lines.append("| operation | " + " | ".join(t for t in present if t != DD) + " |")
        lines.append("|---|" + "---|" * len([t for t in present if t != DD]))
        for op, by_tool in by_op.items():
            cells = []
            for t in present:
                if t == DD:
                    continue
                peak = by_tool.get(t, {}).get("rss_peak_delta_max")
                cells.append("—" if peak is None else f"{peak / MiB:,.0f}")
            lines.append(f"| {OP_TITLES[op]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("### Ratios: anyckpt throughput ÷ the other's (> 1: anyckpt is faster)")
    lines.append("")
    lines.append("| workload | operation | ÷ limit | " + " | ".join(PEER_NAMES) + " |")
    lines.append("|---|---|---|" + "---|" * len(PEER_NAMES))
    for wl, by_op in ratios.items():
        for op, row in by_op.items():
            lim = row.get("limit")
            limit_text = f"{lim:.2f} ({LIMIT_NAMES[op]})" if lim is not None else "—"
            cells = [f"{row[p]:.2f}" if row.get(p) is not None else "—" for p in PEER_NAMES]
            lines.append(f"| {wl} | {OP_TITLES[op]} | {limit_text} | " + " | ".join(cells) + " |")
    lines.append("")
    s3 = summary.get("s3")
    if s3 is not None:
        lines.append("### Sharded save to the S3 test server against one sequential upload")
        lines.append("")
        if "cases" in s3:
            lines.append(sharded_save_s3.render(s3))
        else:
            lines.append(f"Not measured: {s3.get('problem')}")
        lines.append("")
    scale = summary.get("distributed_scale")
    if scale is not None:
        import plot

        lines.append("### Distributed save, simulated (rank 0's CPU seconds; metadata only)")
        lines.append("")
        lines.append(plot.table(scale["points"]))
        lines.append("")
    lines.append("### Targets")
    lines.append("")
    for t in summary["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = f": {t['value']:.2f} (goal {t['goal']:.2f}, {t['detail']})" if "value" in t else ""
        extra = "" if "value" in t else f" ({t['detail']})"
        lines.append(f"- **{mark}** — {t['target']}{value}{extra}")
    problems = []
    for wl, by_op in results.items():
        for op, by_tool in by_op.items():
            for tool, entry in by_tool.items():
                if "problem" in entry:
                    problems.append(f"- {wl} / {op} / {tool}: {entry['problem']}")
                if "check" in entry:
                    problems.append(f"- {wl} / {op} / {tool}: wrong read {entry['check']}")
    if problems:
        lines.append("")
        lines.append("### Not measured, or failed")
        lines.append("")
        lines.extend(sorted(set(problems)))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload's size")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median, spread)")
    p.add_argument("--workloads", nargs="+", default=list(workloads.WORKLOADS))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument(
        "--tools", nargs="+", default=[DD, *(t.name for t in TOOLS)], help="dd, anyckpt, limit..."
    )
    p.add_argument(
        "--no-venvs",
        action="store_true",
        help="only tools in this venv (anyckpt, limits, numpy.savez, dd): no TF, torch, Orbax",
    )
    p.add_argument("--work-dir", default=os.path.join(HERE, "results", "work"))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<time>.json)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measuring process")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--no-s3", action="store_true", help="leave out the sharded save to the S3 test server"
    )
    p.add_argument(
        "--s3",
        action="store_true",
        help="measure the S3 save even when --ops or --tools select part of the suite "
        "(without it, such a partial run leaves S3 out)",
    )
    p.add_argument(
        "--distributed-scale",
        action="store_true",
        help="also simulate a distributed save at 64 to 8,192 ranks (distributed_scale.py "
        "--sweep, metadata only; docs/distributed.md)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also run the long scaling runs (scaling.py: 1e3 to 1e6 tensors, 64 MiB to "
        "2 GiB; docs/performance.md)",
    )
    p.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="never drop the page cache (cold restores are then warm, and say so)",
    )
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    partial = any(a.split("=")[0] in ("--ops", "--tools") for a in given)
    args.no_s3 = args.no_s3 or (partial and not args.s3)
    if args.no_drop_caches:
        os.environ["ANYCKPT_BENCH_NO_DROP"] = "1"  # inherited by every measuring process
    if args.no_venvs:
        keep = {t.name for t in TOOLS if t.in_process} | {DD}
        args.tools = [t for t in args.tools if t in keep]
    return args


def run_scaling(args: argparse.Namespace) -> dict[str, str]:
    """``scaling.py``'s long runs (issue 18), each writing its own JSON beside this run's:
    10^3 ... 10^6 tensors of 1 KiB and of 16 bytes, then 64 MiB ... 2 GiB saved and restored."""
    import scaling

    stem = os.path.splitext(args.out)[0] if args.out else os.path.join(HERE, "results", "bench")
    outs = {"tensors": stem + "-scaling.json", "bytes": stem + "-bytes.json"}
    log("== tensor-count scaling: 1e3 ... 1e6 tensors (scaling.py)", args.quiet)
    counts = ["1000", "10000", "100000", "1000000"]
    scaling.main(["--counts", *counts, "--out", outs["tensors"], *(["--quiet"] * args.quiet)])
    log("== bytes scaling: 64 MiB ... 2 GiB (scaling.py --bytes)", args.quiet)
    scaling.main(["--bytes", "--out", outs["bytes"], *(["--quiet"] * args.quiet)])
    return outs


def run_distributed_scale(args: argparse.Namespace) -> dict[str, Any]:
    """``distributed_scale.py --sweep`` (issue 20), metadata only: 64 to 8,192 ranks at 100
    tensors, and 64 to 1,024 ranks at 1,000 (at 4,096 and 8,192 ranks x 1,000 tensors, rank 0
    alone needs about 7 and 14 GiB: docs/distributed.md). Writes the points beside this run's
    JSON and, with matplotlib (the ``bench`` extra), draws docs/distributed.md's figures there."""
    import distributed_scale

    stem = os.path.splitext(args.out)[0] if args.out else os.path.join(HERE, "results", "bench")
    out = stem + "-distributed-scale.json"
    log("== distributed save, simulated at 64 to 8,192 ranks (distributed_scale.py)", args.quiet)
    timeout = args.timeout * 4
    points = distributed_scale.sweep([64, 256, 1024, 4096, 8192], [100], "fsdp", timeout)
    points += distributed_scale.sweep([64, 256, 1024], [1000], "fsdp", timeout)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(points, f, indent=2)
    figures = stem + "-distributed-scale-img"
    plot = [sys.executable, os.path.join(HERE, "plot.py"), "distributed-scale", out]
    drawn = subprocess.run(
        [*plot, "--out-dir", figures], capture_output=True, text=True, check=False
    )
    if drawn.returncode != 0:
        log(f"   figures not drawn: {drawn.stderr.strip().splitlines()[-1:]}", args.quiet)
    elif not args.quiet:
        print(drawn.stdout)
    return {"points": points, "json": out, "figures": figures if drawn.returncode == 0 else None}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.time()
    load_start = os.getloadavg()
    summary = measure(args)
    if not args.no_s3:
        summary["s3"] = run_s3(args)
        summary["targets"] = evaluate_targets(
            summary["results"], summary["workloads"], summary["s3"]
        )
    if args.distributed_scale:
        summary["distributed_scale"] = run_distributed_scale(args)
    if args.scaling:
        summary["scaling"] = run_scaling(args)
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["machine"]["loadavg_start"] = load_start
    summary["machine"]["loadavg_end"] = os.getloadavg()
    if LOAD_SAMPLES:
        ordered = sorted(LOAD_SAMPLES)
        summary["machine"]["load_1min_during"] = {
            "min": ordered[0],
            "median": statistics.median(ordered),
            "max": ordered[-1],
        }
    out = args.out or os.path.join(
        HERE, "results", time.strftime("bench-%Y%m%d-%H%M%S.json", time.localtime(started))
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    table = render(summary)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    if not args.quiet:
        print(table)
        print(f"\nJSON: {out}  ({summary['wall_seconds']} s)")
    return summary


if __name__ == "__main__":
    main()

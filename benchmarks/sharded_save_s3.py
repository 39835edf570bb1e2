"""Sharded saves to the S3 test server against one sequential upload of the same bytes.

    .venv/bin/python benchmarks/sharded_save_s3.py [--gib 1] [--shards 4] [--repeat 3] [--json F]

Starts the S3-protocol server the tests use (``tests/servers.py s3``: moto in server mode, bound
to 127.0.0.1, stopped at the end) and saves ``--gib`` GiB of float32 (64 tensors) there. Runs
are interleaved (every case's run 1, then every case's run 2...); each object is deleted after
its run. The cases, all with s3fs's default settings:

* ``sequential``: the reference of the performance target, one sequential upload of the same
  bytes: one s3fs file, written tensor by tensor (s3fs sends one 50 MiB part at a time);
* ``pipe``: s3fs ``pipe`` of the same bytes as one ``bytes`` object (s3fs sends 50 MiB parts,
  up to 10 at once), for comparison;
* ``anyckpt shards=1`` and ``anyckpt shards=N``: ``anyckpt.sync.save``, unsharded and over
  ``--shards`` data files (uploaded concurrently);
* ``anyckpt shards=N unsigned``: the same with ``config_kwargs={"s3":
  {"payload_signing_enabled": False}}``: over plain http botocore otherwise puts a SHA-256 of
  every request body in its signature, computed in s3fs's one event-loop thread, which then
  hashes the shards one after the other (on https botocore skips it: TLS and the CRC32
  checksum cover the body).

For each: the wall time, the CPU time of this process (the client) and of the server process
(``/proc/PID/stat``), best and median. The server is a Python process on the same cores as
the client: its CPU time per GiB is the floor of what any client can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TENSORS = 64


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stats(runs: list[dict[str, float]], nbytes: int) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    best = min(walls)
    return {
        "runs": runs,
        "best_s": best,
        "median_s": statistics.median(walls),
        "gib_per_s_best": nbytes / (1 << 30) / best,
        "client_cpu_s_min": min(r["client_cpu_s"] for r in runs),
        "server_cpu_s_min": min(r["server_cpu_s"] for r in runs),
    }


def measure(
    gib: float = 1.0, shards: int = 4, repeat: int = 3, quiet: bool = False
) -> dict[str, Any]:
    """Run every case ``repeat`` times against a fresh server; return the figures."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "servers.py"), "s3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        import s3fs

        import anyckpt.sync

        options: dict[str, Any] = {
            "client_kwargs": {
                "endpoint_url": f"http://127.0.0.1:{port}",
                "region_name": "us-west-2",
            },
            "key": "bench",
            "secret": "bench",
        }
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        rng = np.random.default_rng(0)
        per = max(1, int(gib * (1 << 30)) // TENSORS // 4)
        tensors = {
            f"layer{i:03d}/w": rng.standard_normal(per, dtype=np.float32) for i in range(TENSORS)
        }
        nbytes = sum(t.nbytes for t in tensors.values())
        blob = b"".join(t.tobytes() for t in tensors.values())

        def sequential(where: str) -> None:
            with fs.open(where, "wb") as f:
                for tensor in tensors.values():
                    f.write(tensor.data)

        unsigned = {**options, "config_kwargs": {"s3": {"payload_signing_enabled": False}}}

        def save(count: int, storage_options: dict[str, Any] = options) -> Callable[[str], None]:
            def run(where: str) -> None:
                anyckpt.sync.save(
                    f"s3://{where}/ckpt",
                    tensors,
                    options={"num_shards": count} if count > 1 else None,
                    storage_options=storage_options,
                )

            return run

        cases: dict[str, Callable[[str], None]] = {
            "sequential": sequential,
            "pipe": lambda where: fs.pipe(where, blob),
            "anyckpt shards=1": save(1),
        }
        if shards > 1:
            cases[f"anyckpt shards={shards}"] = save(shards)
        cases[f"anyckpt shards={shards} unsigned"] = save(shards, unsigned)
        for name, case in cases.items():  # warm-up: imports, connections, first-call set-up
            case(f"bench/warmup-{name.replace(' ', '-')}")
            fs.rm(f"bench/warmup-{name.replace(' ', '-')}", recursive=True)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        loads = [os.getloadavg()[0]]
        if not quiet:
            print(
                f"{nbytes / (1 << 30):.3f} GiB in {TENSORS} float32 tensors -> S3 test server "
                f"on 127.0.0.1:{port} (load {loads[0]:.2f})",
                flush=True,
            )
        for rep in range(repeat):
            for name, case in cases.items():
                where = f"bench/{name.replace(' ', '-')}-{rep}"
                loads.append(os.getloadavg()[0])
                wall, cpu, server_cpu = time.perf_counter(), _own_cpu(), _process_cpu(server.pid)
                case(where)
                r = {
                    "wall_s": time.perf_counter() - wall,
                    "client_cpu_s": _own_cpu() - cpu,
                    "server_cpu_s": _process_cpu(server.pid) - server_cpu,
                }
                runs[name].append(r)
                fs.rm(where, recursive=True)
                if not quiet:
                    print(
                        f"  {name:18} run {rep + 1}: {r['wall_s']:.2f} s, client CPU "
                        f"{r['client_cpu_s']:.2f} s, server CPU {r['server_cpu_s']:.2f} s",
                        flush=True,
                    )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
    results = {name: _stats(r, nbytes) for name, r in runs.items()}
    reference = results["sequential"]
    for entry in results.values():
        entry["x_sequential_median"] = reference["median_s"] / entry["median_s"]
        entry["x_sequential_best"] = reference["best_s"] / entry["best_s"]
    ordered = sorted(loads)
    return {
        "bytes": nbytes,
        "tensors": TENSORS,
        "shards": shards,
        "repeat": repeat,
        "load_1min": {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]},
        "cases": results,
    }


def render(figures: dict[str, Any]) -> str:
    """A Markdown table of :func:`measure`'s figures."""
    gib = figures["bytes"] / (1 << 30)
    load = figures["load_1min"]
    lines = [
        f"S3 test server (moto on 127.0.0.1, same cores): {gib:.3f} GiB, {figures['tensors']} "
        f"tensors; best and median of {figures['repeat']} interleaved runs; load "
        f"{load['min']:.2f}-{load['max']:.2f} (median {load['median']:.2f})",
        "",
        "| upload | best s | median s | GiB/s (best) | × sequential (median) | × sequential (best) "
        "| client CPU s | server CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in figures["cases"].items():
        lines.append(
            f"| {name} | {e['best_s']:.2f} | {e['median_s']:.2f} | {e['gib_per_s_best']:.2f} "
            f"| {e['x_sequential_median']:.2f} | {e['x_sequential_best']:.2f} "
            f"| {e['client_cpu_s_min']:.2f} | {e['server_cpu_s_min']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    figures = measure(args.gib, args.shards, args.repeat, args.quiet)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if not args.quiet:
        print()
        print(render(figures))


if __name__ == "__main__":
    main()

"""Sharded against unsharded saves to the S3 test server (moto on 127.0.0.1, through s3fs).

    .venv/bin/python benchmarks/sharded_save_s3.py [--gib 1] [--shards 4] [--repeat 2]

Starts the same S3-protocol server the tests use (``tests/servers.py s3``, loopback only),
saves ``--gib`` GiB of float32 (64 tensors) unsharded and over ``--shards`` data files
(uploaded concurrently), deletes each checkpoint after its save, and prints the median time
and throughput, next to the reference the performance target names: one sequential upload of
the same bytes (one s3fs file, written tensor by tensor). The server is a Python process on
the same two cores, so this measures anyckpt's concurrency against a CPU-bound peer, not a
real object store's bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

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
        per = int(args.gib * (1 << 30)) // 64 // 4
        tensors = {f"layer{i:03d}/w": rng.standard_normal(per, dtype=np.float32) for i in range(64)}
        gib = sum(t.nbytes for t in tensors.values()) / (1 << 30)
        print(f"{gib:.2f} GiB in 64 float32 tensors -> S3 test server on 127.0.0.1:{port}")
        times = []
        for run in range(args.repeat):
            started = time.perf_counter()
            with fs.open(f"bench/sequential-{run}", "wb") as f:
                for tensor in tensors.values():
                    f.write(tensor.data)
            times.append(time.perf_counter() - started)
            fs.rm(f"bench/sequential-{run}")
        reference = statistics.median(times)
        print(
            f"one sequential upload: median {reference:.2f} s, {gib / reference:.2f} GiB/s "
            f"(runs: {', '.join(f'{t:.2f}' for t in times)})"
        )
        for shards in (1, args.shards):
            times = []
            for run in range(args.repeat):
                where = f"bench/s{shards}-{run}"
                started = time.perf_counter()
                anyckpt.sync.save(
                    f"s3://{where}/ckpt",
                    tensors,
                    options={"num_shards": shards} if shards > 1 else None,
                    storage_options=options,
                )
                times.append(time.perf_counter() - started)
                fs.rm(where, recursive=True)
            median = statistics.median(times)
            print(
                f"shards={shards}: median {median:.2f} s, {gib / median:.2f} GiB/s, "
                f"{reference / median:.2f} x the sequential upload "
                f"(runs: {', '.join(f'{t:.2f}' for t in times)})"
            )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""Compression ratio and speed of the zstd format on realistic checkpoint data.

    .venv/bin/python plugins/anyckpt-zstd/bench.py [--mib 64] [--threads 2] [--levels 1,3,9]

Each workload is about ``--mib`` MiB, made with a fixed seed:
- ``float32 weights``: N(0, 0.02) dense-layer weights.
- ``bfloat16 weights``: the same, in bfloat16.
- ``int64 ids``: token ids, Zipf-distributed below a 50,000 vocabulary.
- ``int8 embeddings``: a symmetric-quantized embedding table.
- ``sparse Adam slot``: float32 moments of an embedding table where 5 % of rows were touched.
Prints, per workload, level and shuffle setting: ratio (raw / stored), save and load MiB/s
(of raw bytes, wall time, page cache, no fsync).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import ml_dtypes
import numpy as np

import anyckpt.sync


def workloads(mib: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = int(mib * (1 << 20))
    weights = (rng.standard_normal(n // 4) * 0.02).astype(np.float32)
    rows = n // 4 // 256
    slot = np.zeros((rows, 256), np.float32)
    touched = rng.choice(rows, rows // 20, replace=False)
    slot[touched] = np.abs(rng.standard_normal((len(touched), 256)) * 1e-3)
    table = rng.standard_normal((n // 256, 256)) * 0.05
    scale = np.abs(table).max(axis=1, keepdims=True) / 127
    return {
        "float32 weights": weights.reshape(-1, 1024),
        "bfloat16 weights": (rng.standard_normal(n // 2) * 0.02).astype(ml_dtypes.bfloat16),
        "int64 ids": np.minimum(rng.zipf(1.2, n // 8), 49_999).astype(np.int64),
        "int8 embeddings": np.round(table / scale).astype(np.int8),
        "sparse Adam slot": slot,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=float, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="1,3,9")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="anyckpt-zstd-bench-")
    mib = float(1 << 20)
    print("| data | level | shuffle | ratio | save MiB/s | load MiB/s |")
    print("|---|---:|---|---:|---:|---:|")
    try:
        for name, array in workloads(args.mib).items():
            for level in (int(x) for x in args.levels.split(",")):
                for shuffle in (True, False):
                    prefix = f"{root}/c"
                    options = {"level": level, "shuffle": shuffle, "threads": args.threads}
                    started = time.perf_counter()
                    (path,) = anyckpt.sync.save(
                        prefix, {"t": array}, format="zstd", durable=False, options=options
                    )
                    saved = time.perf_counter()
                    back = anyckpt.sync.load(prefix)["t"]
                    loaded = time.perf_counter()
                    assert back.tobytes() == array.tobytes()
                    stored = float(os.path.getsize(path))
                    ratio = array.nbytes / stored
                    save_speed = array.nbytes / mib / (saved - started)
                    load_speed = array.nbytes / mib / (loaded - saved)
                    print(
                        f"| {name} | {level} | {'yes' if shuffle else 'no'} | {ratio:.2f} "
                        f"| {save_speed:.0f} | {load_speed:.0f} |"
                    )
                    shutil.rmtree(root)
                    root = tempfile.mkdtemp(prefix="anyckpt-zstd-bench-")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

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

    .venv/bin/python plugins/anyckpt-zstd/bench.py --ratios [--mib 16] [--levels 1,3,19]

measures what the reader's ratio limit (``codec.DEFAULT_MAX_RATIO``) must allow: per workload
and level, the highest and lowest ratio of one chunk (4 MiB, shuffled, as the writer compresses
it, before padding), over the workloads above and those that compress most: zeros, a constant,
Adam's second moment ``v`` of an embedding table early in training (0.1 %, 1 %, 5 % of rows
touched), a dense ``v`` after one step, a boolean mask, and a small-integer table.
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


def ratio_workloads(mib: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = int(mib * (1 << 20))
    rows = n // 4 // 256

    def adam_v(touched: float) -> np.ndarray:
        """Adam's v after a few sparse steps: (1 - beta2) * g^2 on the touched rows only."""
        v = np.zeros((rows, 256), np.float32)
        hit = rng.choice(rows, max(1, int(rows * touched)), replace=False)
        v[hit] = 0.001 * np.square(rng.standard_normal((len(hit), 256)) * 1e-2)
        return v

    return {
        "zeros": np.zeros(n // 4, np.float32),
        "constant 0.1": np.full(n // 4, 0.1, np.float32),
        "Adam v, 0.1 % rows": adam_v(0.001),
        "Adam v, 1 % rows": adam_v(0.01),
        "Adam v, 5 % rows": adam_v(0.05),
        "Adam v, dense, step 1": (0.001 * np.square(rng.standard_normal(n // 4) * 1e-2)).astype(
            np.float32
        ),
        "bool mask, 1 % set": rng.random(n) < 0.01,
        "int32 counts 0..9": rng.integers(0, 10, n // 4).astype(np.int32),
        **workloads(mib),
    }


def ratios(mib: float, levels: list[int]) -> None:
    """Per workload and level: the highest and lowest raw/stored ratio of one chunk."""
    import zstandard
    from anyckpt_zstd import codec
    from anyckpt_zstd.format import DEFAULT_CHUNK

    limit = codec.DEFAULT_MAX_RATIO
    print(f"| data | level | max chunk ratio | min chunk ratio | padded to {limit} |")
    print("|---|---:|---:|---:|---|")
    for name, array in ratio_workloads(mib).items():
        raw = array.reshape(-1).view(np.uint8)
        itemsize = array.dtype.itemsize
        for level in levels:
            compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
            found = []
            for start, stop in codec.chunk_spans(raw.nbytes, itemsize, DEFAULT_CHUNK):
                chunk = codec.shuffle(raw[start:stop], itemsize)
                found.append((stop - start) / len(compressor.compress(chunk.data)))
            padded = "yes" if max(found) > codec.DEFAULT_MAX_RATIO else "no"
            print(f"| {name} | {level} | {max(found):,.1f} | {min(found):,.1f} | {padded} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=float, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", default="1,3,9")
    parser.add_argument("--ratios", action="store_true", help="per-chunk ratios only")
    args = parser.parse_args()
    if args.ratios:
        ratios(args.mib, [int(x) for x in args.levels.split(",")])
        return
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

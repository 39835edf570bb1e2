"""PNG figures from the benchmarks' JSON results (matplotlib: ``pip install -e '.[bench]'``).

    .venv/bin/python benchmarks/plot.py distributed-scale RESULTS.json [--out-dir docs/img]

``distributed-scale`` takes the list that ``distributed_scale.py --sweep`` writes and draws,
log-log against the number of ranks, one line per tensor count:

* ``distributed-scale-time.png``: rank 0's plan, merge and commit CPU seconds;
* ``distributed-scale-bytes.png``: what the collectives move in all, and rank 0's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "docs", "img")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(points: list[dict[str, Any]], field: str) -> dict[int, tuple[list[int], list[float]]]:
    """Per tensor count: (ranks, values) of the points that finished."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for point in sorted(points, key=lambda p: (p["tensors"], p["ranks"])):
        if field not in point:
            continue
        xs, ys = out.setdefault(point["tensors"], ([], []))
        xs.append(point["ranks"])
        ys.append(max(float(point[field]), 1e-4))
    return out


def distributed_scale(points: list[dict[str, Any]], out_dir: str) -> list[str]:
    plt = _pyplot()
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, field, title in zip(
        axes,
        ("plan_s", "merge_s", "commit_s"),
        ("plan (rank 0)", "merge: build the index", "commit: index + state file"),
        strict=True,
    ):
        for tensors, (xs, ys) in _series(points, field).items():
            ax.loglog(xs, ys, "o-", label=f"{tensors} tensors", base=2)
        ax.set_title(title)
        ax.set_xlabel("ranks")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("CPU seconds")
    axes[0].legend()
    fig.tight_layout()
    written.append(os.path.join(out_dir, "distributed-scale-time.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tensors, (xs, ys) in _series(points, "collective_bytes").items():
        axes[0].loglog(xs, [y / 2**20 for y in ys], "o-", label=f"{tensors} tensors", base=2)
    axes[0].set_title("bytes moved by the collectives, in all")
    axes[0].set_ylabel("MiB")
    for tensors, (xs, ys) in _series(points, "rank0_peak_mib").items():
        axes[1].loglog(xs, ys, "o-", label=f"{tensors} tensors", base=2)
    axes[1].set_title("rank 0's peak memory (above its start)")
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xlabel("ranks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    written.append(os.path.join(out_dir, "distributed-scale-bytes.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


FIGURES = {"distributed-scale": distributed_scale}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=sorted(FIGURES))
    parser.add_argument("results", help="the JSON results file")
    parser.add_argument("--out-dir", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    os.makedirs(args.out_dir, exist_ok=True)
    for path in FIGURES[args.figure](data, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PNG figures from the benchmarks' JSON results (matplotlib: ``pip install -e '.[bench]'``).

    .venv/bin/python benchmarks/plot.py distributed-scale RESULTS.json [MORE.json ...] \\
        [--out-dir docs/img] [--no-figures]

``distributed-scale`` takes the list that ``distributed_scale.py --sweep`` writes and draws,
log-log against the number of ranks, one line per tensor count:

* ``distributed-scale-time.png``: rank 0's plan, merge and commit CPU seconds;
* ``distributed-scale-bytes.png``: what the collectives move in all, and rank 0's peak memory;
* ``distributed-scale-tensors.png``, when the results hold several tensor counts at one rank
  count: plan, merge and rank 0's peak memory against the tensors, one line per rank count.

It also prints the results as a Markdown table (the one in docs/distributed.md) and the slope of
each quantity on the log-log axes, fitted by least squares: against the ranks at each tensor
count, and against the tensors at each rank count (1: linear; 2: quadratic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

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


#: The quantities whose growth is fitted, and how the table and the slopes name them.
QUANTITIES = {
    "plan_s": "plan s",
    "merge_s": "merge s",
    "commit_s": "commit s",
    "rank0_peak_mib": "rank 0 peak MiB",
    "collective_bytes": "collective bytes",
    "index_bytes": "index bytes",
}


def _by(points: list[dict[str, Any]], fixed: str) -> dict[int, list[dict[str, Any]]]:
    """The finished points grouped by ``fixed`` ("ranks" or "tensors"), the other axis sorted."""
    other = "tensors" if fixed == "ranks" else "ranks"
    groups: dict[int, list[dict[str, Any]]] = {}
    for point in sorted(points, key=lambda p: (p[fixed], p[other])):
        if "plan_s" in point:
            groups.setdefault(point[fixed], []).append(point)
    return groups


def slopes(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Least-squares slope of log(quantity) against log(ranks) at each tensor count, and against
    log(tensors) at each rank count, over three points or more."""
    fits: list[dict[str, Any]] = []
    for fixed, axis in (("tensors", "ranks"), ("ranks", "tensors")):
        for value, group in _by(points, fixed).items():
            if len(group) < 3:
                continue
            xs = np.log([p[axis] for p in group])
            fit: dict[str, Any] = {
                "against": axis,
                fixed: value,
                "range": (group[0][axis], group[-1][axis]),
            }
            for field in QUANTITIES:
                ys = np.log([max(float(p[field]), 1e-4) for p in group])
                fit[field] = round(float(np.polyfit(xs, ys, 1)[0]), 2)
            fits.append(fit)
    return fits


def table(points: list[dict[str, Any]]) -> str:
    """The points as docs/distributed.md's Markdown table."""
    lines = [
        "| ranks × tensors | index entries | plan s | merge s | commit s | rank 0 peak MiB "
        "| collectives MiB | index MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in sorted(points, key=lambda p: (p["tensors"], p["ranks"])):
        head = f"{p['ranks']:,} × {p['tensors']:,}"
        if "plan_s" not in p:
            lines.append(f"| {head} | not finished in {p.get('timeout_s', '?')} s |||||||")
            continue
        lines.append(
            f"| {head} | {p['index_entries']:,} | {p['plan_s']:.2f} | {p['merge_s']:.2f} "
            f"| {p['commit_s']:.3f} | {p['rank0_peak_mib']:,.0f} "
            f"| {p['collective_bytes'] / 2**20:,.1f} | {p['index_bytes'] / 2**20:,.1f} |"
        )
    return "\n".join(lines)


def render_slopes(fits: list[dict[str, Any]]) -> str:
    lines = [
        "| against | at | over | " + " | ".join(QUANTITIES.values()) + " |",
        "| --- | --- | --- |" + " ---: |" * len(QUANTITIES),
    ]
    for fit in fits:
        fixed = "tensors" if fit["against"] == "ranks" else "ranks"
        low, high = fit["range"]
        cells = " | ".join(f"{fit[f]:.2f}" for f in QUANTITIES)
        lines.append(f"| {fit['against']} | {fit[fixed]:,} {fixed} | {low:,}–{high:,} | {cells} |")
    return "\n".join(lines)


def _tensor_figure(points: list[dict[str, Any]], out_dir: str) -> str | None:
    """Plan, merge and rank 0's peak against the tensors, one line per rank count that has
    two tensor counts or more."""
    groups = {n: g for n, g in _by(points, "ranks").items() if len(g) >= 2}
    if not groups:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, field, title, unit in zip(
        axes,
        ("plan_s", "merge_s", "rank0_peak_mib"),
        ("plan (rank 0)", "merge: build the index", "rank 0's peak memory (above its start)"),
        ("CPU seconds", "CPU seconds", "MiB"),
        strict=True,
    ):
        for ranks, group in groups.items():
            xs = [p["tensors"] for p in group]
            ys = [max(float(p[field]), 1e-4) for p in group]
            ax.loglog(xs, ys, "o-", label=f"{ranks} ranks", base=2)
        ax.set_title(title)
        ax.set_xlabel("tensors")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "distributed-scale-tensors.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    tensors = _tensor_figure(points, out_dir)
    if tensors is not None:
        written.append(tensors)
    return written


FIGURES = {"distributed-scale": distributed_scale}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=sorted(FIGURES))
    parser.add_argument("results", nargs="+", help="JSON results files (their lists joined)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT)
    parser.add_argument(
        "--no-figures", action="store_true", help="print the table and the slopes only"
    )
    args = parser.parse_args(argv)
    data: list[dict[str, Any]] = []
    for results in args.results:
        with open(results) as f:
            data.extend(json.load(f))
    if not args.no_figures:
        os.makedirs(args.out_dir, exist_ok=True)
        for path in FIGURES[args.figure](data, args.out_dir):
            print(path)
    print()
    print(table(data))
    print()
    print("Log-log slopes (1: linear, 2: quadratic):")
    print()
    print(render_slopes(slopes(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PNG figures of the scaling runs (``scaling.py``; matplotlib: ``pip install -e '.[bench]'``).

    .venv/bin/python benchmarks/plot_scaling.py tensors RESULTS.json [--out-dir docs/img]
    .venv/bin/python benchmarks/plot_scaling.py bytes RESULTS.json [--out-dir docs/img]
    .venv/bin/python benchmarks/plot_scaling.py async BIG.json [--out-dir docs/img]

``tensors`` (``scaling.py``'s JSON), log-log against the number of tensors, one figure per
tensor size: ``scaling-time-<kind>.png`` (seconds per operation, anyckpt against each peer and
the raw read of the same bytes) and ``scaling-memory-<kind>.png`` (peak memory growth during
the operation, and what it needs beyond what it returns). ``bytes`` (``scaling.py --bytes``):
``scaling-throughput.png``, MiB/s against the bytes saved or restored. ``async``
(``big_async_save.py --out``): ``scaling-async-blocking.png``, the time an async ``save()``
blocked and its peak memory beyond the state, against the state's size.
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
STYLE = {
    "anyckpt": "o-",
    "anyckpt-v1": "v-",
    "anyckpt-zstd": "P-",
    "anyckpt-safetensors": "X-",
    "limit": "kx--",
    "safetensors": "s-",
    "torch.save": "^-",
    "mmap": "d:",
}
#: Tools whose peak memory is drawn (the raw limits are not: they return one buffer).
PEAK_TOOLS = ("safetensors", "torch.save")


def _anyckpt(tool: str) -> bool:
    """anyckpt in one of its formats (``anyckpt`` is V2, ``anyckpt-v1``, the plugins...)."""
    return tool == "anyckpt" or tool.startswith("anyckpt-")


TITLES = {
    "save": "save (page cache)",
    "save_durable": "save, durable (fsync)",
    "restore": "full restore (warm)",
    "restore_cold": "full restore (cold)",
    "restore_subset": "restore 1% of the keys",
    "keys": "keys()",
    "inspect": "anyckpt inspect",
    "verify": "anyckpt verify",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines(
    points: list[dict[str, Any]], kind: str, op: str, field: str
) -> dict[str, tuple[list[int], list[float]]]:
    """Per tool: (x, y) of the points of ``kind`` and ``op`` that finished."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for p in sorted(points, key=lambda p: p["count"]):
        if p["kind"] != kind or p["op"] != op or "error" in p or field not in p:
            continue
        xs, ys = out.setdefault(p["tool"], ([], []))
        xs.append(p["count"])
        ys.append(max(float(p[field]), 1e-6))
    return out


def tensors(summary: dict[str, Any], out_dir: str) -> list[str]:
    plt = _pyplot()
    points = summary["points"]
    written = []
    for kind in sorted({p["kind"] for p in points}):
        nbytes = summary["kinds"][kind]["bytes"]
        ops = [op for op in TITLES if any(p["op"] == op and p["kind"] == kind for p in points)]
        fig, grid = plt.subplots(
            1, len(ops), figsize=(3.2 * len(ops), 3.6), sharey=True, squeeze=False
        )
        axes = grid[0]
        for ax, op in zip(axes, ops, strict=True):
            for tool, (xs, ys) in _lines(points, kind, op, "seconds").items():
                ax.loglog(xs, ys, STYLE.get(tool, "o-"), label=tool)
            ax.set_title(TITLES[op], fontsize=9)
            ax.set_xlabel("tensors")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("seconds")
        fig.suptitle(f"time against tensor count ({nbytes} bytes per tensor)", fontsize=10)
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"scaling-time-{kind}.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        # One anyckpt format: a line per operation; several: a line per format and operation.
        several = len({p["tool"] for p in points if p["kind"] == kind and _anyckpt(p["tool"])}) > 1
        for op in ops:
            for tool, (xs, ys) in _lines(points, kind, op, "peak_bytes").items():
                if (_anyckpt(tool) or tool in PEAK_TOOLS) and op in ("save", "restore", "keys"):
                    mib = [y / 2**20 for y in ys]
                    axes[0].loglog(xs, mib, STYLE.get(tool, "o-"), label=f"{tool} {op}")
            for tool, (xs, ys) in _lines(points, kind, op, "overhead_per_tensor").items():
                if _anyckpt(tool):
                    style = STYLE.get(tool, "o-") if several else "o-"
                    axes[1].semilogx(xs, ys, style, label=f"{tool} {op}" if several else op)
        axes[1].axhline(150, color="r", ls=":", label="target: 150 B")
        axes[0].set_title("peak memory growth during the operation", fontsize=9)
        axes[0].set_ylabel("MiB")
        axes[1].set_title("anyckpt: bytes per tensor beyond what it returns", fontsize=9)
        axes[1].set_ylabel("bytes per tensor")
        for ax in axes:
            ax.set_xlabel("tensors")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(os.path.join(out_dir, f"scaling-memory-{kind}.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def throughput(summary: dict[str, Any], out_dir: str) -> list[str]:
    plt = _pyplot()
    points = summary["points"]
    ops = [op for op in TITLES if any(p["op"] == op for p in points)]
    fig, grid = plt.subplots(1, len(ops), figsize=(3.4 * len(ops), 3.6), sharey=True, squeeze=False)
    axes = grid[0]
    for ax, op in zip(axes, ops, strict=True):
        series: dict[str, tuple[list[float], list[float]]] = {}
        for p in sorted(points, key=lambda p: p["count"]):
            if p["op"] != op or "error" in p or "mib_per_s" not in p:
                continue
            xs, ys = series.setdefault(p["tool"], ([], []))
            xs.append(p["bytes"] / 2**20)
            ys.append(p["mib_per_s"])
        for tool, (xs, ys) in series.items():
            ax.semilogx(xs, ys, STYLE.get(tool, "o-"), label=tool, base=2)
        ax.set_title(TITLES[op], fontsize=9)
        ax.set_xlabel("MiB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("MiB/s")
    fig.tight_layout()
    path = os.path.join(out_dir, "scaling-throughput.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def async_blocking(summary: dict[str, Any], out_dir: str) -> list[str]:
    """``big_async_save.py --out``: how long ``save()`` held the caller, and the peak memory
    beyond the state, against the state's size, one line per ``max_pending_bytes``."""
    plt = _pyplot()
    series: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(summary["points"], key=lambda p: p["state_bytes"]):
        budget = p.get("budget_mib") or 0
        label = f"max_pending_bytes={budget} MiB" if budget else "no budget (copied)"
        series.setdefault(label, []).append(p)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6))
    for label, points in series.items():
        gib = [p["state_bytes"] / 2**30 for p in points]
        left.loglog(gib, [p["blocked_seconds"] for p in points], "o-", label=label)
        right.semilogx(gib, [p["peak_over_before"] / 2**30 for p in points], "o-", label=label)
    left.set_title("async save: time save() blocked", fontsize=9)
    left.set_ylabel("seconds")
    right.set_title("peak RSS beyond the state", fontsize=9)
    right.set_ylabel("GiB")
    for ax in (left, right):
        ax.set_xlabel("state (GiB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "scaling-async-blocking.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


FIGURES = {"tensors": tensors, "bytes": throughput, "async": async_blocking}


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

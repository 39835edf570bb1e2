"""The many-rank simulator (benchmarks/distributed_scale.py) runs, at a small scale, the
library's own planning, data-file, merge and commit code: its checkpoint reads back exactly,
and what its collectives move grows linearly with the ranks (never a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anyckpt.sync

ROOT = Path(__file__).resolve().parents[2]
SIMULATOR = ROOT / "benchmarks" / "distributed_scale.py"


def simulate(tmp_path: Path, ranks: int, tensors: int, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"sim-{ranks}.json"
    cmd = [sys.executable, str(SIMULATOR), "--ranks", str(ranks), "--tensors", str(tensors)]
    cmd += ["--json", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def expected_fsdp(shape: tuple[int, ...], ranks: int) -> np.ndarray:
    """Each rank fills its rows with its rank number."""
    from anyckpt.distributed import even_slice

    full = np.empty(shape, np.float32)
    for rank in range(ranks):
        full[even_slice(shape[0], rank, ranks)] = rank
    return full


def test_a_64_rank_save_reads_back_whole_in_one_process(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    result = simulate(tmp_path, 64, 20, "--dir", str(directory))
    assert result["protocol"] == "gather-scatter"
    assert result["index_entries"] == 64 * 20 + 20  # a slice per rank, a full name per tensor
    assert set(result["collectives"]) == {
        "open: gather + broadcast",
        "manifests: gather to rank 0",
        "plan: scatter from rank 0",
        "reports: gather to rank 0",
        "outcome: broadcast",
    }
    save = result["requests_per_rank"]["save"]
    assert save["other_puts_max"] == 1  # one data file per rank
    restore = result["requests_per_rank"]["restore_half"]
    assert restore["world"] == 32
    assert restore["coalesced_gets_max"] <= restore["gets_max"]
    # On local disk read_slices reads piece by piece as read() does (the coalesced GETs on an
    # object store are held by test_restore_requests.py); one read per saved piece either way.
    assert restore["gets_max"] <= restore["per_tensor_gets_max"] == 2 * 20 + 1
    tensors = anyckpt.sync.load(directory / "ckpt-1")
    assert len(tensors) == 20
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, expected_fsdp(value.shape, 64), err_msg=name)


@pytest.mark.parametrize("layout", ["tp", "replicated"])
def test_other_layouts_write_each_piece_once(tmp_path: Path, layout: str) -> None:
    directory = tmp_path / "run"
    result = simulate(tmp_path, 16, 7, "--layout", layout, "--dir", str(directory))
    tensors = anyckpt.sync.load(directory / "ckpt-1")
    assert len(tensors) == 7
    # Every replica is written once: the data files hold exactly the state's bytes.
    data = sum(p.stat().st_size for p in directory.iterdir() if ".data-" in p.name)
    assert data == sum(v.nbytes for v in tensors.values())
    assert result["layout"] == layout


def test_collective_bytes_grow_linearly_with_the_ranks(tmp_path: Path) -> None:
    """Doubling the ranks (each holding a slice of every tensor) at most doubles what the
    save's collectives move, plus a little: the manifests are gathered, not all-gathered."""
    small = simulate(tmp_path, 32, 40, "--no-data")
    large = simulate(tmp_path, 64, 40, "--no-data")
    for name, size in small["collectives"].items():
        assert large["collectives"][name] <= 2.2 * size, name
    assert large["collective_bytes"] <= 2.2 * small["collective_bytes"]


def _plot_module() -> Any:
    """benchmarks/plot.py (its table and slope fits need NumPy only, not matplotlib)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "benchmarks" / "plot.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _point(ranks: int, tensors: int, per_piece: float, power: float) -> dict[str, Any]:
    pieces = (ranks**power) * tensors
    return {
        "ranks": ranks,
        "tensors": tensors,
        "index_entries": ranks * tensors + tensors,
        "plan_s": per_piece * pieces,
        "merge_s": per_piece * pieces / 2,
        "commit_s": 0.001 * pieces,
        "rank0_peak_mib": 0.002 * pieces,
        "collective_bytes": 150 * pieces,
        "index_bytes": 45 * pieces,
    }


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_the_plot_script_fits_the_log_log_slope(power: float) -> None:
    """docs/distributed.md's slopes: a quantity proportional to ranks^p x tensors has slope p
    against the ranks and 1 against the tensors; a point that timed out is left out."""
    plot = _plot_module()
    points = [_point(n, 100, 1e-6, power) for n in (64, 256, 1024, 4096)]
    points += [_point(1024, t, 1e-6, power) for t in (250, 500, 1000)]
    points.append({"ranks": 8192, "tensors": 100, "layout": "fsdp", "timeout_s": 60})
    fits = {(f["against"], f.get("tensors", f.get("ranks"))): f for f in plot.slopes(points)}
    assert set(fits) == {("ranks", 100), ("tensors", 1024)}
    by_ranks, by_tensors = fits["ranks", 100], fits["tensors", 1024]
    assert by_ranks["range"] == (64, 4096)
    assert by_tensors["range"] == (100, 1000)
    for field in ("plan_s", "merge_s", "commit_s", "rank0_peak_mib", "collective_bytes"):
        assert by_ranks[field] == pytest.approx(power, abs=0.01), field
        assert by_tensors[field] == pytest.approx(1.0, abs=0.01), field
    table = plot.table(points)
    assert "| 1,024 × 1,000 | 1,025,000 |" in table
    assert "| 8,192 × 100 | not finished in 60 s |" in table
    assert len(table.splitlines()) == 2 + len(points)

"""The benchmark suite runs end to end (tiny scale, in-process tools only): it cannot rot.

Asserts the structure of what it reports, never a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
OPS = {"save_durable", "save", "async_save", "restore_warm", "restore_cold", "restore_subset"}


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    cmd = [sys.executable, str(RUN), "--scale", "0.0005", "--runs", "1", "--no-venvs"]
    cmd += ["--workloads", "mixed", "--no-drop-caches", "--quiet"]
    cmd += ["--out", str(out), "--work-dir", str(tmp / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").exists()
    return json.loads(out.read_text())


def test_top_level_structure(summary: dict) -> None:
    for key in ("machine", "command", "scale", "runs", "workloads", "results", "ratios"):
        assert key in summary
    assert summary["runs"] == 1
    assert summary["machine"]["nproc"] >= 1
    meta = summary["workloads"]["mixed"]
    assert meta["tensors"] > 0
    assert meta["bytes"] > 0
    assert meta["subset"] >= 1
    # The venv-only peers are reported as not run, with the reason.
    assert summary["unavailable"]["tensorflow"] == "not run (--no-venvs)"


def test_every_operation_of_anyckpt_measured(summary: dict) -> None:
    results = summary["results"]["mixed"]
    assert set(results) == OPS
    for op in OPS:
        entry = results[op]["anyckpt"]
        assert "problem" not in entry, entry
        assert entry["median_s"] > 0
        assert entry["mib_per_s"] > 0
        assert entry["min_s"] <= entry["median_s"] <= entry["max_s"]
        assert entry["rss_peak_delta_max"] >= 0
        assert "check" not in entry, entry  # restores read back every tensor and byte
    assert "total_seconds_median" in results["async_save"]["anyckpt"]


def test_limits_and_in_process_peers(summary: dict) -> None:
    results = summary["results"]["mixed"]
    assert "mib_per_s" in results["save"]["limit"]  # ndarray.tofile
    assert "mib_per_s" in results["restore_warm"]["limit"]  # readinto
    assert "mib_per_s" in results["async_save"]["limit"]  # numpy.copy
    assert "mib_per_s" in results["save_durable"]["dd"]  # dd conv=fsync
    assert "mib_per_s" in results["restore_cold"]["dd"]  # dd read
    for op in OPS - {"async_save"}:
        assert "mib_per_s" in results[op]["numpy.savez"], op
    # Caches were not dropped: the cold numbers say they are warm.
    assert results["restore_cold"]["anyckpt"]["note"].startswith("caches could not be dropped")


def test_ratios_and_targets(summary: dict) -> None:
    ratios = summary["ratios"]["mixed"]
    assert ratios["save"]["limit"] > 0
    assert ratios["save"]["numpy.savez"] > 0
    targets = summary["targets"]
    assert targets, "the targets are evaluated"
    for target in targets:
        assert set(target) >= {"target", "met", "detail"}
        assert target["met"] in (True, False, None)
    names = " ".join(t["target"] for t in targets)
    assert "async save() blocks" in names
    assert "peak RSS" in names


def test_sharded_save_to_the_s3_test_server(summary: dict) -> None:
    s3 = summary["s3"]
    assert "problem" not in s3, s3
    assert s3["bytes"] > 0
    cases = s3["cases"]
    assert set(cases) == {
        "sequential",
        "pipe",
        "anyckpt shards=1",
        "anyckpt shards=4",
        "anyckpt shards=4 unsigned",
    }
    for entry in cases.values():
        assert len(entry["runs"]) == 1
        assert entry["best_s"] > 0
        assert entry["client_cpu_s_min"] >= 0
        assert entry["server_cpu_s_min"] >= 0
        assert entry["x_sequential_median"] > 0
    assert cases["sequential"]["x_sequential_median"] == 1.0
    target = [t for t in summary["targets"] if "S3 test server" in t["target"]]
    assert len(target) == 1
    assert target[0]["met"] in (True, False)

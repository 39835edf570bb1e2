"""The scaling benchmark (benchmarks/scaling.py) runs end to end at a tiny size: it cannot rot.

Asserts the structure of what it reports, never a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCALING = ROOT / "benchmarks" / "scaling.py"


def _run(tmp: Path, *extra: str) -> dict:
    out = tmp / "scaling.json"
    cmd = [sys.executable, str(SCALING), "--runs", "1", "--quiet", "--tools", "anyckpt", "limit"]
    cmd += ["--out", str(out), "--work-dir", str(tmp / "work"), *extra]
    env = {**os.environ, "ANYCKPT_BENCH_NO_DROP": "1"}  # never evict other tests' files
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").exists()
    assert not (tmp / "work").exists()  # cleaned up
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(tmp_path_factory.mktemp("scaling"), "--counts", "200", "400", "--kinds", "b16")


def test_every_operation_at_every_count(counts: dict) -> None:
    points = counts["points"]
    seen = {(p["tool"], p["op"], p["count"]) for p in points}
    for count in (200, 400):
        for op in ("save", "restore", "restore_subset", "keys", "inspect", "verify"):
            assert ("anyckpt", op, count) in seen
        assert ("limit", "restore", count) in seen
    for p in points:
        assert "error" not in p, p
        assert p["kind"] == "b16"
        assert p["seconds"] > 0
        assert p["us_per_tensor"] == pytest.approx(1e6 * p["seconds"] / p["count"])
        assert p["peak_bytes"] >= 0
        assert p["overhead_per_tensor"] >= 0
    assert counts["kinds"]["b16"]["bytes"] == 16

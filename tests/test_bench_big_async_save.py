"""The async-save sweep (benchmarks/big_async_save.py) runs end to end at a tiny size.

Asserts what it reports (staged or copied, the memory bound), never a timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "big_async_save.py"


def test_a_sweep_reports_staged_and_copied_saves(tmp_path: Path) -> None:
    out = tmp_path / "big.json"
    cmd = [sys.executable, str(SCRIPT), "--gib", "0.0039", "0.0078", "--budget-mib", "1", "0"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    assert [(p["gib"], p["budget_mib"]) for p in points] == [
        (0.0039, 1),
        (0.0039, 0),
        (0.0078, 1),
        (0.0078, 0),
    ]
    for p in points:
        assert p["state_bytes"] >= 4_000_000  # over the 1 MiB budget
        assert p["blocked_seconds"] >= p["capture_seconds"] >= 0
        # Over a 1 MiB budget the state is written from the caller's arrays; without one the
        # copy fits in memory and is taken.
        assert p["staged"] is (p["budget_mib"] == 1)
        assert ("within_bound" in p) is (p["budget_mib"] == 1)
        if p["budget_mib"]:
            assert p["within_bound"] is True
    # One JSON line per configuration on stdout, the same as the file.
    assert [json.loads(line) for line in proc.stdout.splitlines()] == points

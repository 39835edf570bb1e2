"""``anyckpt inspect`` of a checkpoint of many tensors streams its listing (issue 13): specs are
made per row, never all at once, so the command's peak RSS beyond a tiny checkpoint's stays a
bounded number of bytes per tensor (measured in a subprocess, not timed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anyckpt.sync

COUNT = 100_000
#: Bytes of peak RSS per tensor beyond a tiny checkpoint's: the reader's columns (~45), the
#: list of names (~70), the output buffer and allocator slack (measured 279 for V2, 239 for V1;
#: with every spec held at once they were 825 and 1,286).
BOUND = 400


def _peak_rss_of_inspect(prefix: Path, option: str = "--no-progress") -> tuple[int, str]:
    """(peak RSS in bytes, stdout) of ``anyckpt inspect OPTION PREFIX`` in a child."""
    code = (
        "import sys, anyckpt.cli\n"
        "code = anyckpt.cli.main(['inspect', sys.argv[2], sys.argv[1]])\n"
        "sys.stdout.flush()\n"
        # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec.
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "print(hwm[0].split()[1], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(prefix), option],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stderr.split()[-1]) * 1024, done.stdout


@pytest.mark.parametrize("fmt", ["v2", "v1"])
def test_inspect_of_many_tensors_streams_in_bounded_memory(tmp_path: Path, fmt: str) -> None:
    one = np.zeros((), dtype=np.float32)
    small, large = tmp_path / "small" / "c", tmp_path / "large" / "c"
    anyckpt.sync.save(str(small), {f"t{i:07d}": one for i in range(10)}, format=fmt, durable=False)
    tensors = {f"t{i:07d}": one for i in range(COUNT)}
    anyckpt.sync.save(str(large), tensors, format=fmt, durable=False)
    base, _ = _peak_rss_of_inspect(small)
    peak, out = _peak_rss_of_inspect(large)
    lines = out.splitlines()
    assert f"{COUNT} tensors" in lines[0]
    rows = [line for line in lines if line.startswith("  t")]
    assert len(rows) == COUNT
    assert rows[0].split()[0] == "t0000000"
    per_tensor = (peak - base) / COUNT
    print(f"{fmt}: inspect peak RSS {peak / 2**20:.0f} MiB, {per_tensor:.0f} B/tensor beyond")
    assert per_tensor < BOUND, f"{per_tensor:.0f} bytes per tensor"


def test_inspect_json_of_many_tensors_streams_in_bounded_memory(tmp_path: Path) -> None:
    """``inspect --json`` writes its tensors one entry at a time (issue 13: with every entry
    held as a dict, and the whole document as one string, it cost ~1.3 KB per tensor)."""
    import json

    one = np.zeros((2,), dtype=np.float32)
    small, large = tmp_path / "small" / "c", tmp_path / "large" / "c"
    anyckpt.sync.save(str(small), {f"t{i:07d}": one for i in range(10)}, durable=False)
    anyckpt.sync.save(str(large), {f"t{i:07d}": one for i in range(COUNT)}, durable=False)
    base, _ = _peak_rss_of_inspect(small, "--json")
    peak, out = _peak_rss_of_inspect(large, "--json")
    document = json.loads(out)
    assert len(document["tensors"]) == COUNT
    first = document["tensors"][0]
    assert (first["key"], first["dtype"], first["shape"]) == ("t0000000", "float32", [2])
    assert document["parameters"] == 2 * COUNT
    per_tensor = (peak - base) / COUNT
    print(f"inspect --json peak RSS {peak / 2**20:.0f} MiB, {per_tensor:.0f} B/tensor beyond")
    assert per_tensor < BOUND, f"{per_tensor:.0f} bytes per tensor"

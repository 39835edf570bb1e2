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


#: The formats of anyckpt besides V2 (scaling.py's FORMAT_TOOLS) and the files a save writes.
FORMAT_FILES = {
    "anyckpt-v1": ["ckpt"],
    "anyckpt-zstd": ["ckpt.zckpt"],
    "anyckpt-safetensors": ["ckpt.safetensors"],
}
OPS = ("save", "restore", "restore_subset", "keys", "inspect", "verify")


def _run(tmp: Path, *extra: str, tools: tuple[str, ...] = ("anyckpt", "limit")) -> dict:
    out = tmp / "scaling.json"
    cmd = [sys.executable, str(SCALING), "--runs", "1", "--quiet", "--tools", *tools]
    cmd += ["--out", str(out), "--work-dir", str(tmp / "work"), *extra]
    env = {**os.environ, "ANYCKPT_BENCH_NO_DROP": "1"}  # never evict other tests' files
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp / "work").exists()  # cleaned up
    return {**json.loads(out.read_text()), "table": out.with_suffix(".md").read_text()}


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(tmp_path_factory.mktemp("scaling"), "--counts", "200", "400", "--kinds", "b16")


def test_every_operation_at_every_count(counts: dict) -> None:
    points = counts["points"]
    seen = {(p["tool"], p["op"], p["count"]) for p in points}
    for count in (200, 400):
        for op in OPS:
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


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run(
        tmp_path_factory.mktemp("scaling-formats"),
        *("--counts", "200", "400", "--kinds", "b16"),
        tools=tuple(FORMAT_FILES),
    )


def test_v1_and_plugin_formats_every_operation(formats: dict) -> None:
    """Issue 18, target 2: the same operations for V1 and the two plugins' formats, each save
    writing its own format's files (not V2's)."""
    points = formats["points"]
    assert formats["skipped"] == {}
    seen = {(p["tool"], p["op"], p["count"]) for p in points}
    assert seen == {(t, op, c) for t in FORMAT_FILES for op in OPS for c in (200, 400)}
    for p in points:
        assert "error" not in p, p
        assert p["us_per_tensor"] == pytest.approx(1e6 * p["seconds"] / p["count"])
        assert p["overhead_per_tensor"] >= 0
        if p["op"] == "save":
            assert p["files"] == FORMAT_FILES[p["tool"]], p
    for tool in FORMAT_FILES:  # the markdown table has a row per tool and operation
        for op in OPS:
            assert f"| {tool} | {op} |" in formats["table"]

"""docs/distributed.md's example, as a reader runs it: train.py under torchrun on 4 ranks,
then resumed on 2, then the checkpoint read back in one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import anyckpt

pytestmark = pytest.mark.timeout(180)

PAGE = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
BLOCK = re.compile(
    r"<!-- docs-test: skip (?P<why>[^>]*test_docs_example\.py[^>]*) -->\s*```python\n"
    r"(?P<code>.*?)```",
    re.S,
)


def example_blocks() -> list[str]:
    return [m["code"] for m in BLOCK.finditer(PAGE.read_text(encoding="utf-8"))]


def torchrun(nproc: int, script: Path, directory: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(script),
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=script.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_the_example_saves_on_4_ranks_resumes_on_2_and_reads_back(tmp_path: Path) -> None:
    train, read_back = example_blocks()
    script = tmp_path / "train.py"
    script.write_text(train)
    run = tmp_path / "runs" / "distributed"
    out = torchrun(4, script, run)
    assert f"committed {run}/ckpt-3" in out
    with anyckpt.sync.open(run / "ckpt-3") as reader:
        assert reader.files()[-2].endswith(".data-00003-of-00004")  # one file per rank
    out = torchrun(2, script, run)
    assert f"committed {run}/ckpt-6" in out
    # The read-back block, in this process, from the directory the reader would be in.
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        namespace: dict[str, object] = {}
        exec(compile(read_back, str(PAGE), "exec"), namespace)
    finally:
        os.chdir(cwd)
    tensors = namespace["tensors"]
    assert isinstance(tensors, dict)
    assert {k: v.shape for k, v in tensors.items()} == {
        "embedding": (1000, 64),
        "head/bias": (10,),
        "head/weight": (10, 64),
        "step": (),
    }
    # Six steps of training, the last three on another world size, each rank resuming from
    # its own rows: the same numbers as one process doing the same.
    torch.manual_seed(0)
    expected = torch.randn(1000, 64)
    for _ in range(6):
        expected.mul_(0.99)
    np.testing.assert_array_equal(tensors["embedding"], expected.numpy())
    assert int(tensors["step"]) == 6

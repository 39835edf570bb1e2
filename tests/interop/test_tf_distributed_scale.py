"""A save simulated at 64 ranks (benchmarks/distributed_scale.py: the library's own planning,
data-file, merge and commit code) is one ordinary V2 bundle: real TensorFlow reads it whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from oracle_client import TFOracle

from anyckpt.distributed import even_slice

pytestmark = pytest.mark.interop

SIMULATOR = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed_scale.py"


def test_tensorflow_reads_a_simulated_64_rank_save(tf_oracle: TFOracle, tmp_path: Path) -> None:
    directory = tmp_path / "run"
    cmd = [sys.executable, str(SIMULATOR), "--ranks", "64", "--tensors", "13"]
    cmd += ["--dir", str(directory), "--restore-ranks", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = tf_oracle.read(directory / "ckpt-1")
    assert result.errors == {}
    assert len(result.tensors) == 13
    for name, value in result.tensors.items():
        expected = np.empty(value.shape, np.float32)
        for rank in range(64):
            expected[even_slice(value.shape[0], rank, 64)] = rank
        np.testing.assert_array_equal(value, expected, err_msg=name)

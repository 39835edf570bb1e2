"""TensorFlow still reads a directory holding metrics sidecars, and continues it; the sidecars
of the checkpoints TensorFlow's manager deleted are removed when our manager reopens it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from oracle_client import TFOracle

import anyckpt

pytestmark = pytest.mark.interop


def test_tensorflow_reads_and_continues_a_directory_with_sidecars(
    tmp_path: Path, tf_oracle: TFOracle
) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path, max_to_keep=3) as manager:
        for step in (1, 2, 3):
            manager.save({"v": np.int64(step)}, step=step, metrics={"loss": 1.0 / step}).wait()
    state = tf_oracle.state(tmp_path)
    assert state["latest"] == f"{tmp_path}/ckpt-3"
    read = tf_oracle.read(state["latest"])
    assert read.errors == {}
    assert set(read.tensors) == {"v"}  # the metrics are not a tensor
    assert int(read.tensors["v"]) == 3
    # TensorFlow's manager continues the directory: it deletes ckpt-1 and ckpt-2 (not their
    # sidecars, which it does not know about).
    result = tf_oracle.manager_save(tmp_path, [4, 5], max_to_keep=3)
    assert "ckpt-1.metrics.json" in result["files"]
    assert "ckpt-1.index" not in result["files"]
    with anyckpt.sync.CheckpointManager(tmp_path, max_to_keep=3) as manager:
        assert manager.latest_step == 5
        assert manager.metrics(3) == {"loss": 1.0 / 3}
    left = sorted(n for n in os.listdir(tmp_path) if n.endswith(".metrics.json"))
    assert left == ["ckpt-3.metrics.json"]

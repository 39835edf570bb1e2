"""TensorFlow reads the state file our manager writes for sharded V1 checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oracle_client import TFOracle

import anyckpt

pytestmark = pytest.mark.interop


def test_tensorflow_follows_our_sharded_v1_state_file(tmp_path: Path, tf_oracle: TFOracle) -> None:
    options = {"shard_of": lambda k: 0 if k == "a" else 1}
    with anyckpt.sync.CheckpointManager(tmp_path, format="v1", format_options=options) as manager:
        manager.save({"a": np.arange(4, dtype=np.float32), "b": np.int64(7)}, step=7).wait()
    result = tf_oracle.state(tmp_path)
    assert result["latest"] == f"{tmp_path}/ckpt-7-?????-of-00002"
    read = tf_oracle.read(result["latest"])
    assert read.errors == {}
    assert read.tensors["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert int(read.tensors["b"]) == 7

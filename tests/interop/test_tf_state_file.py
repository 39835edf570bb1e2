"""The ``checkpoint`` state file is interchangeable with TensorFlow's, both ways (issue 3).

Starting from ``tf2_object`` (a directory TF's CheckpointManager wrote): our manager continues
it; real TensorFlow (``tf.train.get_checkpoint_state`` / ``latest_checkpoint``) reads what we
wrote; TF's CheckpointManager continues our retention; our manager reads TF's state again.
Two TF subprocesses in all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from oracle_client import TFOracle

import anyckpt.sync

pytestmark = pytest.mark.interop


def _files(*steps: int) -> set[str]:
    return {"checkpoint"} | {
        f"ckpt-{s}.{suffix}" for s in steps for suffix in ("index", "data-00000-of-00001")
    }


def test_tensorflow_and_anyckpt_continue_each_others_state_file(
    tf_oracle: TFOracle, tf_fixtures: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "run"
    shutil.copytree(
        tf_fixtures / "tf2_object", directory, ignore=shutil.ignore_patterns("expected")
    )
    for path in [directory, *directory.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    others = {p.name for p in directory.iterdir()} - _files(2, 3, 4)

    # 1. anyckpt continues TensorFlow's CheckpointManager directory (both on the real clock)
    with anyckpt.sync.CheckpointManager(directory, max_to_keep=3) as manager:
        assert manager.checkpoints == [f"{directory}/ckpt-{s}" for s in (2, 3, 4)]
        assert manager.save({"v/.ATTRIBUTES/VARIABLE_VALUE": np.int64(5)}).wait().step == 5
    assert {p.name for p in directory.iterdir()} == _files(3, 4, 5) | others
    ours = anyckpt.sync.get_checkpoint_state(str(directory))
    assert ours is not None

    # 2. TensorFlow reads our state file exactly as we do
    seen = tf_oracle.state(directory)
    assert seen["latest"] == f"{directory}/ckpt-5" == anyckpt.sync.latest_checkpoint(str(directory))
    assert seen["state"] == {
        "model_checkpoint_path": ours.model_checkpoint_path,
        "all_model_checkpoint_paths": list(ours.all_model_checkpoint_paths),
        "all_model_checkpoint_timestamps": list(ours.all_model_checkpoint_timestamps),
        "last_preserved_timestamp": ours.last_preserved_timestamp,
    }

    # 3. TensorFlow's CheckpointManager adopts our checkpoints and applies max_to_keep to them
    result = tf_oracle.manager_save(directory, [6], max_to_keep=3)
    assert result["checkpoints"] == [f"{directory}/ckpt-{s}" for s in (4, 5, 6)]
    assert set(result["files"]) == _files(4, 5, 6) | others  # TF deleted our ckpt-3
    tf_state = result["state"]
    assert tf_state["all_model_checkpoint_timestamps"][:2] == list(
        ours.all_model_checkpoint_timestamps[1:]
    )
    assert tf_state["last_preserved_timestamp"] == ours.last_preserved_timestamp

    # 4. and anyckpt goes on from TensorFlow's state again
    with anyckpt.sync.CheckpointManager(directory, max_to_keep=3) as manager:
        assert manager.checkpoints == [f"{directory}/ckpt-{s}" for s in (4, 5, 6)]
        assert manager.restore()["v/.ATTRIBUTES/VARIABLE_VALUE"].item() == 6
        assert manager.restore(step=5)["v/.ATTRIBUTES/VARIABLE_VALUE"].item() == 5
        manager.save({"v/.ATTRIBUTES/VARIABLE_VALUE": np.int64(7)}).wait()
    assert {p.name for p in directory.iterdir()} == _files(5, 6, 7) | others

"""The manager with formats other than V2: what it records, deletes and cleans up."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import anyckpt
from anyckpt.storage import TEMP_MARKER

SHARDED_V1 = {"format": "v1", "format_options": {"shard_of": lambda k: 0 if k == "a" else 1}}


def state(step: int) -> dict[str, np.ndarray]:
    return {"a": np.arange(6, dtype=np.float32) * step, "b": np.full(3, step, np.int64)}


def test_sharded_v1_records_tensorflows_pattern(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path, max_to_keep=2, **SHARDED_V1) as manager:
        for step in (1, 2, 3):
            manager.save(state(step), step=step).wait()
        assert manager.latest_step == 3
        assert manager.latest_checkpoint == f"{tmp_path}/ckpt-3-?????-of-00002"
    text = (tmp_path / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-3-?????-of-00002"' in text
    assert 'all_model_checkpoint_paths: "ckpt-2-?????-of-00002"' in text
    # retention deleted every shard of step 1 and nothing else
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint",
        "ckpt-2-00000-of-00002",
        "ckpt-2-00001-of-00002",
        "ckpt-3-00000-of-00002",
        "ckpt-3-00001-of-00002",
    ]
    # latest_checkpoint reads through the pattern, as TensorFlow's does
    latest = anyckpt.sync.latest_checkpoint(str(tmp_path))
    assert latest is not None
    loaded = anyckpt.sync.load(latest)
    assert loaded["b"].tolist() == [3, 3, 3]
    # a new manager continues numbering and restores the latest
    with anyckpt.sync.CheckpointManager(tmp_path, max_to_keep=2, **SHARDED_V1) as manager:
        assert manager.latest_step == 3
        assert manager.restore()["a"].tolist() == (np.arange(6) * 3).tolist()
        assert manager.save(state(4)).wait().step == 4


def test_unsharded_v1_records_the_prefix(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path, format="v1") as manager:
        manager.save(state(1), step=1).wait()
        assert manager.latest_checkpoint == f"{tmp_path}/ckpt-1"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "ckpt-1"]


def test_temporary_files_of_any_format_are_cleaned_up(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path, **SHARDED_V1) as manager:
        manager.save(state(1), step=1).wait()
    debris = [
        f"ckpt-2-00000-of-00002{TEMP_MARKER}abcd1234",
        f"ckpt-2.zst{TEMP_MARKER}00ff00ff",
    ]
    keep = ["notes.txt", f"other-2-00000-of-00002{TEMP_MARKER}abcd1234"]
    for name in debris + keep:
        (tmp_path / name).write_bytes(b"x")
    with anyckpt.sync.CheckpointManager(tmp_path, **SHARDED_V1):
        pass
    names = set(os.listdir(tmp_path))
    assert not names & set(debris)
    assert set(keep) <= names
    assert {"ckpt-1-00000-of-00002", "ckpt-1-00001-of-00002"} <= names

"""What the reliability suites share: the saved values of each step, checks of a checkpoint
directory, and the run mode (CI or long).

``ANYCKPT_RELIABILITY=long`` selects the long mode: hundreds of crash trials, more fuzzing
examples, more endurance saves. The default (CI) mode keeps the whole suite within about two
minutes on two cores.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anyckpt.lease import LOCK_FILE
from anyckpt.storage import TEMP_MARKER, Storage

#: "ci" (default) or "long".
MODE = os.environ.get("ANYCKPT_RELIABILITY", "ci").strip().lower() or "ci"
LONG = MODE == "long"
#: Where the suites write their figures (trials, faults, executions), for docs/reliability.md.
FIGURES = Path(os.environ.get("ANYCKPT_RELIABILITY_FIGURES", "/tmp/anyckpt-reliability"))


def scaled(ci: int, long: int) -> int:
    """A count for the current mode."""
    return long if LONG else ci


def record_figures(suite: str, figures: Mapping[str, Any]) -> None:
    """Append one suite's figures (JSON lines) for the report in docs/reliability.md."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    with (FIGURES / f"figures-{os.getpid()}.jsonl").open("a") as f:  # one file per test run
        f.write(json.dumps({"suite": suite, "mode": MODE, **figures}) + "\n")


def values(step: int, big: int = 0) -> dict[str, np.ndarray]:
    """The state saved at ``step``: every value is a function of the step alone, so a restore
    proves which step's save it came from. ``big`` adds a float32 tensor of that many elements
    (a longer write, for crash timing)."""
    rng = np.random.default_rng(step)
    out = {
        "dense/kernel": rng.standard_normal((32, 16)).astype(np.float32),
        "dense/bias": np.arange(16, dtype=np.int64) * step,
        "step": np.array(step, dtype=np.int64),
        "names": np.array([f"step-{step}".encode(), b"", b"\x00\xff"], dtype=object),
    }
    if big:
        out["big"] = np.full(big, step, dtype=np.float32)
    return out


def assert_values(restored: Mapping[str, np.ndarray], step: int, big: int = 0) -> None:
    """``restored`` holds exactly the values saved at ``step``."""
    want = values(step, big)
    assert sorted(restored) == sorted(want), (sorted(restored), step)
    for key, array in want.items():
        got = restored[key]
        assert got.dtype == array.dtype, (key, got.dtype, array.dtype)
        assert got.shape == array.shape, (key, got.shape, array.shape)
        if array.dtype == object:
            assert got.tolist() == array.tolist(), (key, step)
        else:
            assert np.array_equal(got, array), (key, step)


def checkpoint_files(name: str, num_shards: int) -> set[str]:
    return {f"{name}.index"} | {
        f"{name}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)
    }


def list_names(storage: Storage, root: str) -> set[str]:
    """Names of the files in a directory, straight from the store."""
    return set(storage.listdir(root))


def assert_clean(
    names: set[str], tracked: list[str], *, num_shards: int, lock: bool | None = None
) -> None:
    """The directory holds the state file, the tracked checkpoints' files and (``lock``: must,
    False: must not, None: may) the lock file; nothing else: no temporary files, no files of
    checkpoints nobody tracks."""
    allowed = {"checkpoint", LOCK_FILE}
    for name in tracked:
        allowed |= checkpoint_files(name, num_shards)
    assert not [n for n in names if TEMP_MARKER in n], names
    assert names <= allowed, sorted(names - allowed)
    for name in tracked:
        assert checkpoint_files(name, num_shards) <= names, (name, sorted(names))
    if lock is not None:
        assert (LOCK_FILE in names) == lock, sorted(names)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))

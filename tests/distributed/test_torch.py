"""Multi-process saves and restores on torch.distributed (gloo), with real processes.

Each test starts 2-4 rank processes (launch.py, worker.py); they save or restore through
``CheckpointManager(..., coordinator=TorchCoordinator())`` on local disk or the S3 test server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from launch import RankResult, launch
from oracle_client import TFOracle, assert_tensors_identical
from states import global_state

import anyckpt
from anyckpt.distributed import even_slice
from anyckpt.storage import TEMP_MARKER

pytestmark = pytest.mark.timeout(180)


def same(results: list[RankResult], key: str) -> Any:
    values = [r.ok()[key] for r in results]
    assert all(v == values[0] for v in values), values
    return values[0]


def assert_state_equal(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype, key
        assert got[key].shape == want.shape, key
        if want.dtype == object:
            assert got[key].tolist() == want.tolist(), key
        else:
            np.testing.assert_array_equal(got[key], want, err_msg=key)


# -- 4 ranks on local disk -----------------------------------------------------------------


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RankResult]]:
    """Steps 1-3 saved by 4 ranks, keeping 2; then every rank sweeps with max_to_keep=1."""
    work = tmp_path_factory.mktemp("four-ranks")
    url = work / "run"
    results = launch(
        "save",
        4,
        work,
        {"url": str(url), "steps": [1, 2, 3], "max_to_keep": 2, "sweep_max_to_keep": 1},
    )
    return url, results


def test_every_rank_learns_each_commit_and_retention(
    four_ranks: tuple[Path, list[RankResult]],
) -> None:
    url, results = four_ranks
    events = same(results, "events_deleted")
    assert events == [[], [], [f"{url}/ckpt-1"]]  # retention ran once, seen by every rank
    assert same(results, "latest") == f"{url}/ckpt-3"
    assert same(results, "swept") == [f"{url}/ckpt-2"]
    assert same(results, "checkpoints") == [f"{url}/ckpt-3"]
    state = anyckpt.sync.CheckpointManager  # the state file says the same to anyone
    with state(url) as manager:
        assert manager.checkpoints == [f"{url}/ckpt-3"]


def test_four_ranks_write_four_files_and_one_index(
    four_ranks: tuple[Path, list[RankResult]],
) -> None:
    url, _ = four_ranks
    names = set(os.listdir(url)) - {"checkpoint.lock"}
    assert names == {
        "checkpoint",
        "ckpt-3.index",
        *(f"ckpt-3.data-{i:05d}-of-00004" for i in range(4)),
    }


def test_single_process_load_reads_the_four_rank_checkpoint(
    four_ranks: tuple[Path, list[RankResult]],
) -> None:
    url, _ = four_ranks
    assert_state_equal(anyckpt.sync.load(url / "ckpt-3"), global_state(4, 3))
    with anyckpt.sync.open(url / "ckpt-3") as reader:
        # Sharded tensors are stored as partitioned ones, a slice per rank that held rows.
        rows = [p.extents[0] for p in reader.spec("model/emb").partitions]
        assert rows == [(0, 3), (3, 3), (6, 2), (8, 2)]
        assert len(reader.spec("model/tiny").partitions) == 2  # ranks 2 and 3 held nothing
        assert reader.spec("model/zero").shape == (0, 5)


def test_replicated_tensors_are_written_once(four_ranks: tuple[Path, list[RankResult]]) -> None:
    url, results = four_ranks
    data = sum((url / f"ckpt-3.data-{i:05d}-of-00004").stat().st_size for i in range(4))
    with anyckpt.sync.open(url / "ckpt-3") as reader:
        keys = reader.keys()
        indexed = sum(reader.spec(k).nbytes or 0 for k in keys)
    assert data == indexed  # no byte in the files that the index does not point to
    written = [r.ok()["events_bytes"][-1] for r in results]
    assert sum(written) == data
    # Every rank wrote a share; replicas went to the ranks with the least to write.
    assert all(w > 0 for w in written)
    numeric = sum(a.nbytes for a in global_state(4, 3).values() if a.dtype != object)
    assert data - numeric == len(b"alpha") + len(b"step3") + 2 + 4  # the string tensor


@pytest.mark.parametrize("world_size", [2, 3])
def test_restore_on_another_world_size_reads_only_each_ranks_share(
    four_ranks: tuple[Path, list[RankResult]], tmp_path: Path, world_size: int
) -> None:
    url, _ = four_ranks
    results = launch("restore", world_size, tmp_path, {"url": str(url)})
    full = global_state(4, 3)
    for rank, result in enumerate(results):
        out = result.ok()
        wanted = {
            "model/emb": even_slice(10, rank, world_size),
            "model/table": even_slice(6, rank, world_size),
            "model/cols": even_slice(4, rank, world_size),
            "model/bias": slice(None),
        }
        expected = {k: full[k][s] for k, s in wanted.items()}
        assert_state_equal(result.arrays, expected)
        assert out["bytes_read"] == sum(a.nbytes for a in expected.values())


@pytest.mark.interop
def test_tensorflow_reads_the_four_rank_checkpoint(
    four_ranks: tuple[Path, list[RankResult]], tf_oracle: TFOracle
) -> None:
    url, _ = four_ranks
    result = tf_oracle.read(url / "ckpt-3")
    assert not result.errors
    assert_tensors_identical(result.tensors, global_state(4, 3))
    restored = tf_oracle.restore(url / "ckpt-3", [("model/emb", "10 3 4,3:-")])
    np.testing.assert_array_equal(restored[0], global_state(4, 3)["model/emb"][4:7])


# -- the S3 test server ----------------------------------------------------------------------


def test_s3_save_on_three_ranks_restore_on_two(s3_bucket: Any, tmp_path: Path) -> None:
    url = f"{s3_bucket.url}/run"
    args = {"url": url, "storage_options": s3_bucket.storage_options}
    saved = launch(
        "save",
        3,
        tmp_path,
        {**args, "steps": [5], "format_options": {"max_shard_bytes": 64}},
    )
    assert same(saved, "latest") == f"{url}/ckpt-5"
    fs = s3_bucket.filesystem()
    data = [p for p in fs.ls(f"{s3_bucket.name}/run", detail=False) if ".data-" in p]
    assert len(data) > 3  # max_shard_bytes: several files per rank
    assert all(p.endswith(f"-of-{len(data):05d}") for p in data)
    loaded = anyckpt.sync.load(f"{url}/ckpt-5", storage_options=s3_bucket.storage_options)
    assert_state_equal(loaded, global_state(3, 5))
    restored = launch("restore", 2, tmp_path, args)
    full = global_state(3, 5)
    for rank, result in enumerate(restored):
        rows = even_slice(10, rank, 2)
        np.testing.assert_array_equal(result.arrays["model/emb"], full["model/emb"][rows])
        np.testing.assert_array_equal(result.arrays["model/bias"], full["model/bias"])


# -- failures ----------------------------------------------------------------------------------


def test_a_rank_that_fails_to_write_fails_the_save_everywhere(tmp_path: Path) -> None:
    url = tmp_path / "run"
    results = launch("faults", 3, tmp_path, {"url": str(url), "bad": 2})
    for rank, result in enumerate(results):
        out = result.ok()
        assert out["1"]["ok"]
        assert out["1"]["latest"] == "ckpt-1"
        # Step 2: rank 2 could not write; every rank gets an error, nothing is committed,
        # nothing of step 2 stays behind.
        step2 = out["2"]
        if rank == 2:
            assert step2["type"] == "OSError"
        else:
            assert step2["type"] == "CheckpointError"
            assert "failed on rank 2" in step2["message"]
        assert "No space left on device (injected)" in step2["message"]
        assert step2["latest"] == "ckpt-1"
        assert step2["files"] == []
        # Step 3: ranks disagree on a tensor's shape: refused alike on every rank.
        assert out["3"]["type"] == "PlanError"
        assert "'model/bias' differs between ranks" in out["3"]["message"]
        assert out["3"]["files"] == []
        # Step 4: the group is still in step.
        assert out["4"]["ok"]
        assert out["4"]["latest"] == "ckpt-4"


def test_a_rank_killed_mid_save_commits_nothing_and_hangs_nobody(tmp_path: Path) -> None:
    url = tmp_path / "run"
    timeout = 40.0
    results = launch(
        "kill", 3, tmp_path, {"url": str(url), "victim": 1, "timeout": timeout, "linger": 3}
    )
    assert results[1].returncode == -9, results[1].describe()
    for rank in (0, 2):
        out = results[rank].ok()
        assert out["step2"]["type"] in {"CoordinationError", "CheckpointError"}, out
        # Learnt from the closed connections, not by waiting out the timeout.
        assert out["step2"]["seconds"] < timeout / 4, out
        assert out["step3"]["type"] == "CoordinationError", out
        assert out["step3"]["seconds"] < 2, out
        assert out["latest"] == "ckpt-1"
    # Half-written files of step 2 may remain; the next manager to open the directory
    # removes them, and the last commit is intact.
    with anyckpt.sync.CheckpointManager(url) as manager:
        assert manager.latest_step == 1
        assert_state_equal(manager.restore(), global_state(3, 1))
    leftovers = [n for n in os.listdir(url) if n.startswith("ckpt-2") or TEMP_MARKER in n]
    assert leftovers == []


def test_a_rank_that_stops_taking_part_times_its_peers_out(tmp_path: Path) -> None:
    url = tmp_path / "run"
    results = launch(
        "hang", 2, tmp_path, {"url": str(url), "idle": 1, "idle_seconds": 6, "timeout": 2}
    )
    assert results[1].ok() == {"idle": True}
    out = results[0].ok()
    assert out["2"]["type"] == "CoordinationError"
    assert 1.5 <= out["2"]["seconds"] < 5, out
    assert "Timed out" in out["2"]["message"]  # gloo's own timeout, not a closed connection
    assert out["3"]["type"] == "CoordinationError"  # the group is out of step: refused
    assert out["3"]["seconds"] < 1
    assert "earlier collective failed" in out["3"]["message"]
    assert out["latest"] == "ckpt-1"

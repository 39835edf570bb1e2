"""Metrics recorded per checkpoint (issue 16): the sidecar codec, its place in the commit
protocol (written before the commit, deleted with the checkpoint, cleaned as debris), BestN
through the manager across restarts, and best_checkpoint."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import given
from hypothesis import strategies as st

import anyckpt
from anyckpt.codecs import DecodeError
from anyckpt.codecs.metrics import check_metrics, decode_metrics, encode_metrics
from anyckpt.formats.layout import metrics_path
from anyckpt.retention import Any as AnyOf
from anyckpt.retention import BestN, LatestN
from anyckpt.storage import Storage

names = st.text(min_size=1, max_size=8)


@given(st.integers(0, 2**40), st.dictionaries(names, st.floats()))
def test_sidecar_roundtrip(step: int, metrics: dict[str, float]) -> None:
    data = encode_metrics(step, metrics)
    constants: list[str] = []
    json.loads(data, parse_constant=constants.append)  # strict JSON, readable by anything
    assert constants == []
    back = decode_metrics(data)
    assert set(back) == set(metrics)
    for k, v in metrics.items():
        assert back[k] == v if math.isfinite(v) else math.isnan(back[k])


@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_metrics(data)


@pytest.mark.parametrize(
    "bad", [b"[]", b'{"metrics": 3}', b'{"metrics": {"a": "x"}}', b'{"metrics": {"a": NaN}}']
)
def test_decoding_refuses_what_is_not_a_metrics_file(bad: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_metrics(bad)


@pytest.mark.parametrize("bad", [{"": 1.0}, {3: 1.0}, {"a": "x"}, {"a": True}, {"a": 10**400}])
def test_bad_metrics_are_refused(bad: dict[object, object]) -> None:
    with pytest.raises(TypeError, match="metric"):
        check_metrics(bad)  # type: ignore[arg-type]


def test_sidecar_name_of_a_v1_sharded_pattern() -> None:
    assert metrics_path("d/ckpt-5") == "d/ckpt-5.metrics.json"
    assert metrics_path("d/ckpt-5-?????-of-00002") == "d/ckpt-5.metrics.json"


def sidecars(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".metrics.json"))


def test_best_n_through_the_manager_across_restarts(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    retention = AnyOf(LatestN(1), BestN(1, "loss"))
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3}
    with anyckpt.sync.CheckpointManager(directory, retention=retention) as m:
        for step, loss in losses.items():
            m.save({"w": np.full(2, step)}, step=step, metrics={"loss": loss}).wait()
        assert [p.rsplit("/", 1)[-1] for p in m.checkpoints] == ["ckpt-2", "ckpt-4"]
        assert m.best_checkpoint("loss") == f"{directory}/ckpt-2"
        assert m.best_checkpoint("loss", "max") == f"{directory}/ckpt-4"
        assert m.best_checkpoint("accuracy") is None
        assert m.metrics() == {"loss": 0.3}
        assert m.metrics(2) == {"loss": 0.1}
    # The sidecars of deleted checkpoints went with them.
    assert sidecars(directory) == ["ckpt-2.metrics.json", "ckpt-4.metrics.json"]
    # A new manager reads the recorded metrics: ckpt-2 stays the best, ckpt-4 goes.
    with anyckpt.sync.CheckpointManager(directory, retention=retention) as m:
        m.save({"w": np.zeros(2)}, step=5, metrics={"loss": 0.2}).wait()
        assert [p.rsplit("/", 1)[-1] for p in m.checkpoints] == ["ckpt-2", "ckpt-5"]
        assert m.restore()["w"].tolist() == [0, 0]  # the newest is kept: resume works
    assert sidecars(directory) == ["ckpt-2.metrics.json", "ckpt-5.metrics.json"]


def test_sidecar_is_written_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the sidecar is written, neither the index (the commit marker) nor the state file
    names the checkpoint yet."""
    seen: list[tuple[str, bool, bool]] = []
    original = Storage.write_bytes

    def observe(self: Storage, path: str, data: bytes, **kw: object) -> None:
        if path.endswith(".metrics.json"):
            prefix = path[: -len(".metrics.json")]
            state = anyckpt.sync.get_checkpoint_state(str(tmp_path))
            named = state is not None and state.model_checkpoint_path.endswith(
                os.path.basename(prefix)
            )
            seen.append((os.path.basename(path), os.path.exists(prefix + ".index"), named))
        original(self, path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Storage, "write_bytes", observe)
    with anyckpt.sync.CheckpointManager(tmp_path) as m:
        m.save({"w": np.zeros(2)}, step=1, metrics={"loss": 1.0}).wait()
        m.save({"w": np.zeros(2)}, step=2).wait()  # no metrics: no sidecar
    assert seen == [("ckpt-1.metrics.json", False, False)]
    assert sidecars(tmp_path) == ["ckpt-1.metrics.json"]


def test_debris_rules_count_the_sidecar_as_part_of_its_checkpoint(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path) as m:
        m.save({"w": np.zeros(2)}, step=1, metrics={"loss": 1.0}).wait()
    # An interrupted save of step 2 (sidecar only), a sidecar left by TensorFlow's manager
    # deleting step 0 (it removes only .index/.data), and an unrelated file.
    (tmp_path / "ckpt-2.metrics.json").write_bytes(encode_metrics(2, {"loss": 0.5}))
    (tmp_path / "ckpt-0.metrics.json").write_bytes(encode_metrics(0, {"loss": 0.5}))
    (tmp_path / "notes.metrics.json").write_text("{}")
    with anyckpt.sync.CheckpointManager(tmp_path) as m:
        assert m.metrics() == {"loss": 1.0}
    assert sidecars(tmp_path) == ["ckpt-1.metrics.json", "notes.metrics.json"]


def test_a_corrupt_sidecar_is_named(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path) as m:
        m.save({"w": np.zeros(2)}, step=1, metrics={"loss": 1.0}).wait()
    (tmp_path / "ckpt-1.metrics.json").write_bytes(b"{not json")
    with (
        anyckpt.sync.CheckpointManager(tmp_path) as m,
        pytest.raises(anyckpt.CorruptCheckpointError, match=r"ckpt-1\.metrics\.json"),
    ):
        m.best_checkpoint("loss")


class FailStep2FS(MemoryFileSystem):
    """``failstep2://``: memory:// whose writes of step 2's data hit ENOSPC."""

    protocol = "failstep2"
    store: ClassVar[dict[str, Any]] = {}  # type: ignore[misc]
    pseudo_dirs: ClassVar[list[str]] = [""]  # type: ignore[misc]

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode and "ckpt-2.data" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("failstep2", FailStep2FS, clobber=True)


def test_a_failed_save_leaves_no_sidecar_and_deletes_nothing() -> None:
    FailStep2FS.store.clear()
    url = "failstep2://run"
    with anyckpt.sync.CheckpointManager(url, max_to_keep=1) as m:
        m.save({"w": np.zeros(2)}, step=1, metrics={"loss": 1.0}).wait()
        pending = m.save({"w": np.ones(2)}, step=2, metrics={"loss": 0.1})
        with pytest.raises(OSError, match="No space"):
            pending.wait()
        assert m.latest_step == 1
    files = sorted(p.rsplit("/", 1)[-1] for p in FailStep2FS.store if "run/" in p)
    assert [f for f in files if f.startswith("ckpt")] == [
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
        "ckpt-1.metrics.json",
    ]

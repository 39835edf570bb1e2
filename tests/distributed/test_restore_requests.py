"""A restore at another world size reads each rank's bytes in a few coalesced ranged GETs
(``V2Reader.read_slices``), counted on a real fsspec filesystem: not one GET per saved piece."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fsspec import register_implementation
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anyckpt.sync
from anyckpt.distributed import even_slice

ROOT = Path(__file__).resolve().parents[2]
SIMULATOR = ROOT / "benchmarks" / "distributed_scale.py"
TENSORS = 12


class CountingMemoryFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """``countmem://``: memory:// (its own store) counting the requests an object store
    would see: every ranged or whole read (``cat_file``, ``open`` for reading) by path."""

    protocol = "countmem"
    store: dict[str, Any] = {}  # noqa: RUF012 (fsspec's convention: a class-level store)
    pseudo_dirs = [""]  # noqa: RUF012
    gets: Counter[str] = Counter()  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        text = str(path).removeprefix("countmem://").strip("/")
        return "/" + text if text else ""

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> Any:
        type(self).gets[self._strip_protocol(path)] += 1
        return super().cat_file(path, start=start, end=end, **kw)

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        if "r" in mode:
            type(self).gets[self._strip_protocol(path)] += 1
        return super()._open(path, mode, **kw)


register_implementation("countmem", CountingMemoryFileSystem, clobber=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A checkpoint saved by 4 simulated ranks (the simulator's real save code), copied
    onto countmem://; its URL there and its local copy."""
    tmp = tmp_path_factory.mktemp("restore-requests")
    directory = tmp / "run"
    cmd = [sys.executable, str(SIMULATOR), "--ranks", "4", "--tensors", str(TENSORS)]
    cmd += ["--rows-per-rank", "2", "--width", "8", "--dir", str(directory)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = CountingMemoryFileSystem()
    root = f"/run-{uuid.uuid4().hex}"
    for path in directory.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{root}/{path.relative_to(directory).as_posix()}", path.read_bytes())
    yield f"countmem://{root}", directory
    fs.rm(root, recursive=True)


def test_a_restore_at_half_the_world_makes_a_few_gets_per_rank(saved: tuple[str, Path]) -> None:
    url, local = saved
    full = anyckpt.sync.load(local / "ckpt-1")
    names = sorted(full)
    assert len(names) == TENSORS
    with anyckpt.sync.CheckpointManager(url) as manager:
        for rank in range(2):
            keys = {name: even_slice(full[name].shape[0], rank, 2) for name in names}
            CountingMemoryFileSystem.gets.clear()
            got = manager.restore(1, keys=keys)
            gets = dict(CountingMemoryFileSystem.gets)
            for name in names:
                np.testing.assert_array_equal(got[name], full[name][keys[name]])
            data = {path: n for path, n in gets.items() if ".data-" in path}
            # The rank's rows were saved by two ranks, in two data files: one GET each
            # (before read_slices: one per saved piece, 2 per tensor).
            assert len(data) == 2, gets
            assert all(n == 1 for n in data.values()), gets
            assert sum(gets.values()) <= 6, gets  # plus the index and the manager's state


_LOADED: dict[str, dict[str, np.ndarray]] = {}


def loaded(saved: tuple[str, Path]) -> dict[str, np.ndarray]:
    """The saved checkpoint read whole from its local copy (once)."""
    if saved[0] not in _LOADED:
        _LOADED[saved[0]] = anyckpt.sync.load(saved[1] / "ckpt-1")
    return _LOADED[saved[0]]


boxes = st.lists(
    st.tuples(st.integers(0, 64), st.integers(0, 64), st.integers(0, 8), st.integers(0, 8)),
    min_size=TENSORS,
    max_size=TENSORS,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(boxes=boxes, ints=st.lists(st.booleans(), min_size=TENSORS, max_size=TENSORS))
def test_read_slices_equals_a_full_loads_slices(
    saved: tuple[str, Path], boxes: list[tuple[int, int, int, int]], ints: list[bool]
) -> None:
    url, _ = saved
    full = loaded(saved)
    names = sorted(full)
    keys: dict[str, Any] = {}
    for name, (a, b, c, d), as_int in zip(names, boxes, ints, strict=True):
        rows = full[name].shape[0]
        if as_int:
            keys[name] = min(a, rows - 1)
        elif a % 5 == 0:
            keys[name] = None
        else:
            keys[name] = (slice(a, b), slice(c, d))[: full[name].ndim]
    with anyckpt.sync.CheckpointManager(url) as manager:
        got = manager.restore(1, keys=keys)
    for name, index in keys.items():
        want = full[name] if index is None else full[name][index]
        assert got[name].dtype == want.dtype
        np.testing.assert_array_equal(got[name], want)


def test_plain_tensors_and_strings_read_in_part_with_one_get_per_file() -> None:
    root = f"countmem:///plain-{uuid.uuid4().hex}"
    rng = np.random.default_rng(0)
    state = {f"t{i:02d}": rng.standard_normal((40, 5)).astype(np.float32) for i in range(10)}
    state["s"] = np.array([b"a", b"bc", b"def"], dtype=object)
    with anyckpt.sync.CheckpointManager(root) as manager:
        manager.save(state, step=1).wait()
        keys: dict[str, Any] = {f"t{i:02d}": np.s_[i : i + 7, 1:4] for i in range(10)}
        keys["s"] = np.s_[1:]
        CountingMemoryFileSystem.gets.clear()
        got = manager.restore(1, keys=keys)
        gets = dict(CountingMemoryFileSystem.gets)
    for name, index in keys.items():
        np.testing.assert_array_equal(got[name], state[name][index])
    data = {path: n for path, n in gets.items() if ".data-" in path}
    # One GET for the ten numeric boxes (30 row runs, coalesced), one for the strings.
    assert sum(data.values()) == 2, gets


def test_whole_tensors_read_with_parts_are_still_checksummed() -> None:
    from anyckpt.errors import CorruptCheckpointError

    root = f"/crc-{uuid.uuid4().hex}"
    state = {"a": np.arange(64, dtype=np.float32), "b": np.ones((8, 4), np.float32)}
    with anyckpt.sync.CheckpointManager(f"countmem://{root}") as manager:
        manager.save(state, step=1).wait()
        fs = CountingMemoryFileSystem()
        [data] = [p for p in fs.find(root) if ".data-" in p]
        blob = bytearray(fs.cat_file(data))
        blob[5] ^= 0xFF  # inside "a" (saved first, at offset 0)
        fs.pipe_file(data, bytes(blob))
        with pytest.raises(CorruptCheckpointError, match="checksum"):
            manager.restore(1, keys={"a": None, "b": np.s_[2:4]})
        # A part cannot be checked against the whole tensor's checksum (as read(name, index)).
        got = manager.restore(1, keys={"a": np.s_[10:20], "b": np.s_[2:4]})
    np.testing.assert_array_equal(got["a"], state["a"][10:20])

"""A full restore reads small tensors from the index's columns (``V2Reader._read_columns``):
the same arrays as key-by-key reads, in runs that respect the gather bound, and without a
garbage-collected object per tensor (issue 18: the cyclic GC made warm restores slow)."""

from __future__ import annotations

import gc
from pathlib import Path

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.formats.v2_layout import GATHER_BYTES, PARALLEL_BYTES
from anyckpt.formats.v2_reader import _runs


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, PARALLEL_BYTES - 1), st.integers(0, 3 << 20), st.booleans()),
        max_size=40,
    )
)
def test_runs_cover_back_to_back_entries_within_the_gather_bound(
    items: list[tuple[int, int, bool]],
) -> None:
    offsets, ends, at = [], [], 0
    for size, gap, has_gap in items:
        at += gap if has_gap else 0
        offsets.append(at)
        ends.append(at + size)
        at += size
    runs = _runs(np.array(offsets, dtype=np.int64), np.array(ends, dtype=np.int64))
    covered = [i for lo, hi in runs for i in range(lo, hi)]
    assert covered == list(range(len(offsets)))
    for lo, hi in runs:
        assert hi > lo
        for i in range(lo + 1, hi):
            assert offsets[i] == ends[i - 1]  # back to back inside a run
        assert ends[hi - 1] - offsets[lo] <= GATHER_BYTES
    starts = {lo for lo, _ in runs}
    for i in range(1, len(offsets)):
        if offsets[i] != ends[i - 1]:
            assert i in starts  # a gap always starts a new run


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    state: dict[str, np.ndarray] = {}
    for i in range(300):
        state[f"layer_{i:03d}/w"] = rng.standard_normal((4, i % 7 + 1)).astype(np.float32)
        state[f"layer_{i:03d}/b"] = rng.integers(0, 9, i % 5, dtype=np.int64)
    state["bf16"] = rng.standard_normal(33).astype(ml_dtypes.bfloat16)
    state["empty"] = np.zeros((0, 3), np.float32)
    state["scalar"] = np.array(2.5, np.float64)
    state["strings"] = np.array([b"a", b"", b"ccc"], dtype=object)
    state["big"] = rng.integers(0, 255, PARALLEL_BYTES + 5, dtype=np.uint8)
    return state


def test_full_restore_equals_key_by_key_reads(tmp_path: Path) -> None:
    state = _state()
    prefix = tmp_path / "ckpt"
    anyckpt.sync.save(prefix, state)
    loaded = anyckpt.sync.load(prefix)
    assert list(loaded) == sorted(state)  # key order
    one_by_one = anyckpt.sync.load(prefix, list(state))
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        if value.dtype == object:
            assert loaded[key].tolist() == value.tolist()
        else:
            assert loaded[key].tobytes() == value.tobytes(), key
            assert one_by_one[key].tobytes() == value.tobytes(), key
            assert loaded[key].flags.writeable, key
            assert loaded[key].flags.owndata, key
    # Each array owns its memory: changing one leaves the others as they were.
    loaded["layer_000/w"][...] = 0
    assert loaded["layer_001/w"].tobytes() == state["layer_001/w"].tobytes()


def test_full_restore_of_small_tensors_leaves_the_gc_little_to_track(tmp_path: Path) -> None:
    """Before: an entry record, a (name, entry) pair, a result triple and a memoryview with
    its managed buffer per tensor, ~5 tracked objects each, ~75 gen-0 collections for
    10,000 tensors at the default threshold."""
    count = 20_000
    prefix = tmp_path / "ckpt"
    anyckpt.sync.save(prefix, {f"t/{i:05d}": np.full(8, i, np.float32) for i in range(count)})
    anyckpt.sync.load(prefix)  # imports and first-call set-up out of the way
    collections = [0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 0:
            collections[0] += 1

    threshold = gc.get_threshold()
    gc.collect()
    gc.set_threshold(100, *threshold[1:])
    gc.callbacks.append(callback)
    try:
        loaded = anyckpt.sync.load(prefix)
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*threshold)
    assert len(loaded) == count
    assert loaded["t/12345"].tolist() == [12345.0] * 8
    # Fewer than 0.1 tracked objects per tensor (the event loop and threads make a few).
    assert collections[0] * 100 < count // 10, collections[0]

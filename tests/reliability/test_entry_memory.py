"""Memory per entry of a V2 or V1 checkpoint of many tiny tensors (issue 13, defect 7): ``keys()``
and a full ``load`` allocate a bounded number of bytes per tensor beyond what they return
(tracemalloc peak minus what the result holds), and an open reader holds a bounded number of
bytes per tensor (columns, not an object per entry). Before the index was kept as columns V2
took ~430 and ~810 bytes per tensor beyond the result (issue 18 wants under 150); V1, whose
meta was one protobuf message and a dict of objects, 527 and 868."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import anyckpt.sync

COUNT = 100_000
#: Bytes per tensor allowed beyond the result: the columns (~45), the index bytes (~24),
#: and the names and tuples of one chunk of 16,384 entries spread over 100,000.
KEYS_BOUND = 150
LOAD_BOUND = 200
#: Bytes per tensor an open reader may hold: V1's columns are ~32 (name, offsets, dtype,
#: file), V2's ~45, plus the table's block index.
OPEN_BOUND = 80


@pytest.fixture(scope="module", params=["v2", "v1"])
def prefix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp(f"many-{request.param}") / "ckpt")
    one = np.zeros((), dtype=np.float32)
    tensors = {f"t{i:07d}": one for i in range(COUNT)}
    anyckpt.sync.save(path, tensors, format=request.param, durable=False)
    return path


def _beyond_result(action: Callable[[], Any]) -> tuple[Any, float]:
    """(result, peak bytes per tensor allocated beyond what the result still holds)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = action()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, (peak - held) / COUNT


def test_keys_of_many_tiny_tensors_cost_little_beyond_the_names(prefix: str) -> None:
    def keys() -> list[str]:
        with anyckpt.sync.open(prefix) as reader:
            return reader.keys()

    names, extra = _beyond_result(keys)
    assert names == [f"t{i:07d}" for i in range(COUNT)]
    print(f"keys: {extra:.0f} B/tensor")
    assert extra < KEYS_BOUND, f"{extra:.0f} bytes per tensor"


def test_load_of_many_tiny_tensors_costs_little_beyond_the_arrays(prefix: str) -> None:
    loaded, extra = _beyond_result(lambda: anyckpt.sync.load(prefix))
    assert len(loaded) == COUNT
    assert loaded["t0099999"].shape == ()
    print(f"load: {extra:.0f} B/tensor")
    assert extra < LOAD_BOUND, f"{extra:.0f} bytes per tensor"


def test_an_open_reader_holds_columns_not_an_object_per_tensor(prefix: str) -> None:
    gc.collect()
    tracemalloc.start()
    try:
        with anyckpt.sync.open(prefix) as reader:
            assert len(reader.keys()) == COUNT  # every entry decoded, the list dropped
            held, _ = tracemalloc.get_traced_memory()
            # Specs made from the columns, in order and not: nothing is kept per entry.
            for i in range(0, COUNT, 7):
                assert reader.spec(f"t{i:07d}").shape == ()
            assert reader.spec("t0000007").dtype == np.float32
            after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"open: {held / COUNT:.0f} B/tensor, specs {after - held}")
    assert held / COUNT < OPEN_BOUND, f"{held / COUNT:.0f} bytes per tensor"
    assert after - held < 64 << 10, f"specs kept {after - held} bytes"

"""Memory per entry of a V2 checkpoint of many tiny tensors (issue 13, defect 7): ``keys()`` and
a full ``load`` allocate a bounded number of bytes per tensor beyond what they return
(tracemalloc peak minus what the result holds). Before the index was kept as columns they took
~430 and ~810 bytes per tensor beyond the result; issue 18 wants under 150."""

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


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("many") / "ckpt")
    one = np.zeros((), dtype=np.float32)
    anyckpt.sync.save(path, {f"t{i:07d}": one for i in range(COUNT)}, durable=False)
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
    assert extra < KEYS_BOUND, f"{extra:.0f} bytes per tensor"


def test_load_of_many_tiny_tensors_costs_little_beyond_the_arrays(prefix: str) -> None:
    loaded, extra = _beyond_result(lambda: anyckpt.sync.load(prefix))
    assert len(loaded) == COUNT
    assert loaded["t0099999"].shape == ()
    assert extra < LOAD_BOUND, f"{extra:.0f} bytes per tensor"

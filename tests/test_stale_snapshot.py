"""The stale-snapshot guard (issue 16): arrays saved with ``copy=False`` that change before
their save commits fail it with StaleSnapshotError naming the tensor, and nothing is
committed; unchanged arrays commit; ``stale_check=None`` turns it off."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sink_fs import Slowness

import anyckpt
from anyckpt.staleness import StaleSnapshotError, changed_tensor, digest


def where() -> str:
    return f"memory://stale-{uuid.uuid4().hex}"


@pytest.mark.anyio
async def test_a_mutated_array_fails_the_save_and_nothing_is_committed() -> None:
    state = {"model": {"w": np.zeros((64, 64), np.float32)}, "b": np.zeros(3)}
    directory = where()
    async with anyckpt.CheckpointManager(directory) as manager:
        await (await manager.save(state, step=1, copy=False))  # unchanged: commits
        pending = await manager.save(state, step=2, copy=False)
        state["model"]["w"] += 1.0  # an optimizer step while the save is being written
        with pytest.raises(StaleSnapshotError, match=r"tensor 'model/w' changed .* step 2"):
            await pending
        assert manager.latest_step == 1
        restored = await manager.restore()
        assert not restored["model/w"].any()  # the committed checkpoint is step 1's
    names = anyckpt.sync.get_checkpoint_state(directory)
    assert names is not None
    assert names.model_checkpoint_path.endswith("ckpt-1")
    assert issubclass(StaleSnapshotError, anyckpt.CheckpointError)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    Slowness.gate = event = threading.Event()
    Slowness.entered = threading.Semaphore(0)
    try:
        yield event
    finally:
        event.set()
        Slowness.gate = None


@pytest.mark.parametrize("mode", ["sample", "full"])
def test_sync_facade_mutation_during_the_write(gate: threading.Event, mode: str) -> None:
    w = np.arange(1 << 16, dtype=np.float64)
    with anyckpt.sync.CheckpointManager(
        f"sinkmem://stale-{uuid.uuid4().hex}", stale_check=mode
    ) as manager:
        pending = manager.save({"w": w}, step=1, copy=False)
        Slowness.entered.acquire()  # the data is being written
        w *= 0.5
        gate.set()
        with pytest.raises(StaleSnapshotError, match="'w'"):
            pending.wait()
        assert manager.latest_step is None


def test_full_catches_one_changed_element_and_none_turns_it_off() -> None:
    big = np.zeros(1 << 20, np.uint8)
    recorded = digest({"big": big}, "full")
    big[123_457] = 1  # one byte, probably between the sampled runs
    assert changed_tensor({"big": big}, recorded, "full") == "big"
    directory = where()

    async def main() -> None:
        async with anyckpt.CheckpointManager(directory, stale_check=None) as manager:
            pending = await manager.save({"big": big}, step=1, copy=False)
            big[0] = 7
            await pending  # not checked: committed with what was written
            assert (await manager.restore())["big"][0] == 7

    anyio.run(main)
    with pytest.raises(ValueError, match="stale_check"):
        anyckpt.CheckpointManager(directory, stale_check="crc")


arrays = st.one_of(
    st.binary(min_size=1, max_size=4096).map(lambda b: np.frombuffer(b, np.uint8).copy()),
    st.integers(1, 32).map(lambda n: np.arange(n * n, dtype=np.float32).reshape(n, n).T),
)


@settings(max_examples=200, deadline=None)
@given(array=arrays, where_=st.integers(0, 1 << 30), mode=st.sampled_from(["sample", "full"]))
def test_any_change_to_a_small_or_strided_array_is_seen(
    array: np.ndarray, where_: int, mode: str
) -> None:
    """Up to 4 KiB an array is digested whole in both modes (strided views too)."""
    recorded = digest({"a": array}, mode)  # type: ignore[arg-type]
    assert changed_tensor({"a": array}, recorded, mode) is None  # type: ignore[arg-type]
    index = np.unravel_index(where_ % array.size, array.shape)
    old = array[index]
    array[index] = old + 1 if array.dtype != np.uint8 else (int(old) + 1) % 256
    assert changed_tensor({"a": array}, recorded, mode) == "a"  # type: ignore[arg-type]


def test_sample_sees_an_update_of_every_element_of_a_large_array() -> None:
    w = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float32)  # 16 MiB
    recorded = digest({"w": w}, "sample")
    w -= 1e-3 * np.sign(w)  # what an optimizer step does
    assert changed_tensor({"w": w}, recorded, "sample") == "w"
    strided = np.random.default_rng(1).standard_normal((2048, 2048))[:, ::2]
    recorded = digest({"s": strided}, "sample")
    strided += 1.0
    assert changed_tensor({"s": strided}, recorded, "sample") == "s"

"""Steps are integers: Python or NumPy integers are accepted; a float, a string, a bool or
anything else is a TypeError, before anything is written (``int()`` would have turned
``200.9`` into checkpoint 200 and ``"7"`` into 7). Asynchronous, synchronous and distributed
saves, and restore, alike."""

from __future__ import annotations

import fractions
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import anyckpt
from anyckpt.distributed import SingleProcessCoordinator
from anyckpt.manager import check_step

pytestmark = pytest.mark.anyio

BAD_STEPS: list[Any] = [
    200.9,
    7.0,
    "7",
    b"7",
    True,
    np.bool_(True),
    np.float64(3),
    Decimal(3),
    fractions.Fraction(3),
    np.array([3]),
    [3],
    complex(3),
]
GOOD_STEPS: list[Any] = [3, np.int64(3), np.int8(3), np.uint32(3), np.intp(3)]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _state() -> dict[str, Any]:
    return {"w": np.arange(4, dtype=np.float32)}


@pytest.mark.parametrize("step", BAD_STEPS, ids=repr)
async def test_async_save_refuses_a_non_integer_step(tmp_path: Path, step: Any) -> None:
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match="step must be an integer"):
            await manager.save(_state(), step=step)
        assert list(manager.checkpoints) == []
        pending = await manager.save(_state())  # the next step is still 1: nothing was taken
        await pending
        assert pending.step == 1
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]


@pytest.mark.parametrize("step", GOOD_STEPS, ids=repr)
async def test_async_save_takes_numpy_integers(tmp_path: Path, step: Any) -> None:
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        pending = await manager.save(_state(), step=step)
        await pending
        assert type(pending.step) is int
        assert pending.step == 3
        assert manager.latest_checkpoint == str(tmp_path / "ckpt-3")
        restored = await manager.restore(step=step)
    np.testing.assert_array_equal(restored["w"], _state()["w"])


@pytest.mark.parametrize("step", [200.9, "3", True], ids=repr)
async def test_restore_refuses_a_non_integer_step(tmp_path: Path, step: Any) -> None:
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        await (await manager.save(_state(), step=3))
        with pytest.raises(TypeError, match="step must be an integer"):
            await manager.restore(step=step)


@pytest.mark.parametrize("step", [200.9, "7", False], ids=repr)
def test_sync_manager_refuses_a_non_integer_step(tmp_path: Path, step: Any) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match="step must be an integer"):
            manager.save(_state(), step=step)
        manager.save(_state(), step=np.int32(200)).wait()
        with pytest.raises(TypeError, match="step must be an integer"):
            manager.restore(step=step)
        assert manager.latest_step == 200


@pytest.mark.parametrize("step", [200.9, "7", True], ids=repr)
async def test_distributed_save_refuses_a_non_integer_step(tmp_path: Path, step: Any) -> None:
    async with anyckpt.CheckpointManager(
        tmp_path, coordinator=SingleProcessCoordinator()
    ) as manager:
        with pytest.raises(TypeError, match="step must be an integer"):
            await manager.save(_state(), step=step)
        assert list(manager.checkpoints) == []
        await (await manager.save(_state(), step=np.int64(5)))
        assert manager.latest_step == 5
    assert not any(name.startswith("ckpt-200") for name in os.listdir(tmp_path))


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_check_step_keeps_every_integer(value: int) -> None:
    assert check_step(value) == value
    assert check_step(np.int64(value)) == value


@given(st.floats(allow_nan=True) | st.text() | st.booleans() | st.none())
def test_check_step_refuses_everything_else(value: Any) -> None:
    with pytest.raises(TypeError):
        check_step(value)

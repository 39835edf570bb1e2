"""The distributed save path in one process (SingleProcessCoordinator), and the manager's
partial restore. Multi-process runs are in test_torch.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anyckpt
from anyckpt.distributed import (
    Coordinator,
    PlanError,
    Sharded,
    SingleProcessCoordinator,
    even_slice,
)
from anyckpt.distributed.base import scatter
from anyckpt.storage import Storage


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def sample() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "a/w": rng.standard_normal((6, 5)).astype(np.float32),
        "a/b": np.arange(5, dtype=np.int16),
        "names": np.array([b"x", b"", b"long" * 10], dtype=object),
        "p": anyckpt.Partitioned.split(np.arange(40, dtype=np.float64).reshape(8, 5), 3),
        "scalar": np.array(3, dtype=np.int64),
        "empty": np.zeros((0, 2), dtype=np.float32),
    }


def test_single_process_coordinator_is_a_coordinator() -> None:
    coordinator = SingleProcessCoordinator()
    assert isinstance(coordinator, Coordinator)
    assert (coordinator.rank, coordinator.world_size) == (0, 1)
    assert coordinator.all_gather("x") == ["x"]
    assert coordinator.scatter(["y"]) == "y"
    assert coordinator.gather("x") == ["x"]
    assert coordinator.broadcast("x") == "x"
    with pytest.raises(ValueError, match="rank 1"):
        coordinator.gather("x", dst=1)


def test_scatter_without_the_coordinators_own_falls_back_to_a_broadcast() -> None:
    class Minimal:  # a third-party coordinator that predates scatter
        rank, world_size, timeout = 1, 3, 1.0

        def __init__(self) -> None:
            self.broadcasts: list[object] = []

        def broadcast(self, obj: object, src: int = 0) -> object:
            self.broadcasts.append(obj)
            return ["a", "b", "c"]

    minimal = Minimal()
    assert scatter(minimal, None, 0) == "b"  # type: ignore[arg-type]
    assert minimal.broadcasts == [None]


@pytest.mark.anyio
async def test_one_rank_save_is_byte_identical_to_an_ordinary_save(tmp_path: Path) -> None:
    """With one rank, the merged bundle is exactly what anyckpt.save writes (which is what
    TensorFlow writes)."""
    await anyckpt.save(tmp_path / "plain" / "ckpt-1", sample())
    async with anyckpt.CheckpointManager(
        tmp_path / "dist", coordinator=SingleProcessCoordinator()
    ) as manager:
        await (await manager.save(sample(), step=1))
    for suffix in (".index", ".data-00000-of-00001"):
        plain = (tmp_path / "plain" / f"ckpt-1{suffix}").read_bytes()
        assert (tmp_path / "dist" / f"ckpt-1{suffix}").read_bytes() == plain, suffix


@pytest.mark.anyio
async def test_a_piece_covering_the_whole_tensor_reads_back_whole_and_in_part(
    tmp_path: Path,
) -> None:
    full = np.arange(60, dtype=np.float32).reshape(12, 5)
    async with anyckpt.CheckpointManager(
        tmp_path, coordinator=SingleProcessCoordinator()
    ) as manager:
        await (await manager.save({"s": Sharded(full, full.shape, (0, 0))}, step=1))
        got = await manager.restore(keys={"s": np.s_[3:7]})
    np.testing.assert_array_equal(got["s"], full[3:7])
    async with anyckpt.open(tmp_path / "ckpt-1") as reader:
        assert [p.extents for p in reader.spec("s").partitions] == [((0, 12), (0, 5))]
        np.testing.assert_array_equal(await reader.read("s"), full)


@pytest.mark.anyio
async def test_pieces_that_do_not_cover_the_tensor_are_refused(tmp_path: Path) -> None:
    full = np.ones((4, 2), dtype=np.float32)
    async with anyckpt.CheckpointManager(
        tmp_path, coordinator=SingleProcessCoordinator()
    ) as manager:
        with pytest.raises(PlanError, match="do not tile"):
            await (await manager.save({"w": Sharded(full[:2], (4, 2), (0, 0))}, step=1))
        assert manager.latest_checkpoint is None
        # Nothing was written, and the manager carries on.
        await (await manager.save({"w": full}, step=2))
    names = set(os.listdir(tmp_path)) - {"checkpoint.lock"}
    assert names == {"checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"}


@pytest.mark.anyio
async def test_a_state_that_cannot_be_prepared_fails_the_save_at_once(tmp_path: Path) -> None:
    async with anyckpt.CheckpointManager(
        tmp_path, coordinator=SingleProcessCoordinator()
    ) as manager:
        with pytest.raises(TypeError):
            await manager.save({"bad": np.array([1 + 2j], dtype=np.complex256)}, step=1)
        pending = await manager.save({"ok": np.ones(2)}, step=2)
        await pending
        assert manager.latest_step == 2


@pytest.mark.anyio
async def test_sweep_and_retention_with_a_coordinator(tmp_path: Path) -> None:
    for max_to_keep in (None, 1):
        async with anyckpt.CheckpointManager(
            tmp_path, max_to_keep=max_to_keep, coordinator=SingleProcessCoordinator()
        ) as manager:
            if max_to_keep is None:
                for step in (1, 2, 3):
                    await (await manager.save({"x": np.full(2, step)}, step=step))
                assert len(manager.checkpoints) == 3
            else:
                deleted, _ = await manager.sweep()
                assert [Path(d).name for d in deleted] == ["ckpt-1", "ckpt-2"]
                assert [Path(c).name for c in manager.checkpoints] == ["ckpt-3"]
    state = await anyckpt.get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert list(state.all_model_checkpoint_paths) == [f"{tmp_path}/ckpt-3"]


def test_options_a_distributed_save_does_not_support(tmp_path: Path) -> None:
    coordinator = SingleProcessCoordinator()
    with pytest.raises(ValueError, match="V2"):
        anyckpt.CheckpointManager(tmp_path, format="v1", coordinator=coordinator)
    with pytest.raises(ValueError, match="write_meta_graph"):
        anyckpt.CheckpointManager(tmp_path, write_meta_graph=True, coordinator=coordinator)
    with pytest.raises(ValueError, match="not supported"):
        anyckpt.CheckpointManager(
            tmp_path, format_options={"devices": {"w": "/cpu:0"}}, coordinator=coordinator
        )


def test_sharded_validates_its_piece() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Sharded(np.ones((3, 2)), (4, 2), (2, 0))
    with pytest.raises(ValueError, match="same rank"):
        Sharded(np.ones(3), (4, 2), (0, 0))
    with pytest.raises(ValueError, match="scalar"):
        Sharded(np.float32(1), (), ())
    piece = Sharded.split(np.arange(10).reshape(5, 2), 1, 2)
    assert piece.extents == ((3, 2), (0, 2))
    with pytest.raises(TypeError, match="coordinator"):
        np.asarray(piece)


@pytest.mark.anyio
async def test_sharded_without_a_coordinator_is_refused(tmp_path: Path) -> None:
    piece = Sharded.split(np.ones((4, 2)), 0, 2)
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match="coordinator"):
            await manager.save({"w": piece}, step=1)


class CountingStorage:
    """Counts the bytes read from data files (wraps Storage.open_reader)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        real = Storage.open_reader
        counter = self

        class Reader:
            def __init__(self, inner: Any) -> None:
                self._inner, self.path, self.size = inner, inner.path, inner.size

            def read(self, offset: int, length: int) -> bytes:
                counter.bytes += length
                return bytes(self._inner.read(offset, length))

            def read_into(self, offset: int, buffer: Any) -> None:
                counter.bytes += memoryview(buffer).nbytes
                self._inner.read_into(offset, buffer)

            def close(self) -> None:
                self._inner.close()

        def open_reader(storage: Storage, path: str) -> Any:
            reader = real(storage, path)
            return Reader(reader) if ".data-" in path else reader

        monkeypatch.setattr(Storage, "open_reader", open_reader)


@pytest.mark.anyio
async def test_restore_a_part_reads_only_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restoring rows of a tensor stored in 4 pieces, as a rank of a 3-rank job after a
    4-rank save does: only the rows asked for are read, across piece boundaries."""
    full = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    async with anyckpt.CheckpointManager(tmp_path) as manager:  # no coordinator needed
        await (
            await manager.save({"w": anyckpt.Partitioned.split(full, 4), "b": np.ones(100)}, step=1)
        )
    counting = CountingStorage(monkeypatch)
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        for rank in range(3):
            rows = even_slice(10, rank, 3)
            counting.bytes = 0
            got = await manager.restore(keys={"w": rows})
            np.testing.assert_array_equal(got["w"], full[rows])
            assert counting.bytes == full[rows].nbytes
        counting.bytes = 0
        got = await manager.restore(keys={"w": (slice(2, 5), slice(1, 3)), "b": 3})
        np.testing.assert_array_equal(got["w"], full[2:5, 1:3])
        assert got["b"] == 1.0
        assert counting.bytes == full[2:5, 1:3].nbytes + 8


def test_restore_in_part_through_the_sync_manager(tmp_path: Path) -> None:
    full = np.arange(12, dtype=np.int32).reshape(4, 3)
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save({"w": full}, step=1).wait()
        got = manager.restore(keys={"w": np.s_[1:3]})
    np.testing.assert_array_equal(got["w"], full[1:3])


@pytest.mark.anyio
async def test_a_state_over_most_of_the_available_memory_is_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As without a coordinator: a rank whose copy would take most of the memory the system
    has available (here made to report 64 KiB) is not copied but written while save() waits,
    so the caller may change its arrays as soon as save() returns."""
    import anyckpt.save_control

    assert (anyckpt.save_control.available_memory() or 1) > 0  # the real probe answers
    monkeypatch.setattr(anyckpt.save_control, "available_memory", lambda: 64 << 10)
    big = np.arange(1 << 16, dtype=np.float32)  # 256 KiB
    async with anyckpt.CheckpointManager(
        tmp_path, coordinator=SingleProcessCoordinator()
    ) as manager:
        staged = await manager.save({"w": big}, step=1)
        big[:] = -1  # the checkpoint already holds the values it had when save() returned
        small = await manager.save({"w": np.ones(4, np.float32)}, step=2)
        await staged
        await small
    assert staged.event is not None
    assert small.event is not None
    assert staged.event.staged
    assert not small.event.staged
    assert staged.event.blocked_seconds >= staged.event.write_seconds > 0
    restored = await anyckpt.load(tmp_path / "ckpt-1")
    assert np.array_equal(restored["w"], np.arange(1 << 16, dtype=np.float32))

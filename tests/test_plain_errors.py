"""Every public entry point raises the error itself — a ``CorruptCheckpointError``, a
``CheckpointNotFoundError``, an ``IndexError`` for an index out of range — never an
``ExceptionGroup`` from the task groups inside, under asyncio and trio, whatever the format.

Each checkpoint has several tensors in several files (V2: three data shards; V1: three shard
files), so several concurrent reads fail at once: the case a task group would wrap.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anyckpt
from anyckpt.distributed import SingleProcessCoordinator

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

FORMATS = {"v2": {"num_shards": 3}, "v1": {"num_shards": 3}, "zstd": {}, "safetensors": {}}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {f"layer{i}/w": rng.standard_normal((64, 64)).astype(np.float32) for i in range(6)}


def _data_files(directory: Path, name: str) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(name)
        and not p.name.endswith((".index", ".meta"))
        and p.name != "checkpoint"
    )


def _damage(directory: Path, name: str, how: str) -> None:
    """Damage every data file of checkpoint ``name``: every tensor read fails."""
    files = _data_files(directory, name)
    assert files, list(directory.iterdir())
    for path in files:
        data = bytearray(path.read_bytes())
        if how == "truncated":
            path.write_bytes(bytes(data[: len(data) // 4]))
        elif how == "missing":
            path.unlink()
        else:  # "flipped": a byte in the middle of the tensors
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))


async def _write(directory: Path, fmt: str) -> None:
    async with anyckpt.CheckpointManager(
        directory, format=fmt, format_options=FORMATS[fmt]
    ) as manager:
        await (await manager.save(_state(), step=1))


def _is_plain(exc: BaseException) -> None:
    assert not isinstance(exc, BaseExceptionGroup), repr(exc)
    assert isinstance(exc, (anyckpt.CheckpointError, IndexError, ValueError)), repr(exc)


async def _entry_points(directory: Path) -> dict[str, Callable[[], Awaitable[Any]]]:
    prefix = directory / "ckpt-1"
    keys = list(_state())

    async def manager_restore() -> Any:
        async with anyckpt.CheckpointManager(directory) as manager:
            return await manager.restore()

    async def manager_restore_parts() -> Any:
        async with anyckpt.CheckpointManager(directory) as manager:
            return await manager.restore(keys={k: (slice(0, 8),) for k in keys})

    async def distributed_restore() -> Any:
        async with anyckpt.CheckpointManager(
            directory, coordinator=SingleProcessCoordinator()
        ) as manager:
            return await manager.restore(keys={k: (slice(0, 8),) for k in keys})

    async def reader_read_many() -> Any:
        async with anyckpt.open(prefix) as reader:
            return await reader.read_many(verify=True)

    async def reader_read() -> Any:
        async with anyckpt.open(prefix) as reader:
            return [await reader.read(k) for k in keys]

    async def distributed_restore_all() -> Any:
        async with anyckpt.CheckpointManager(
            directory, coordinator=SingleProcessCoordinator()
        ) as manager:
            return await manager.restore()

    return {
        "distributed manager.restore()": distributed_restore_all,
        "load": lambda: anyckpt.load(prefix),
        "load_keys": lambda: anyckpt.load(prefix, keys),
        "read_many": reader_read_many,
        "read": reader_read,
        "manager.restore": manager_restore,
        "manager.restore(keys={...})": manager_restore_parts,
        "distributed manager.restore(keys=)": distributed_restore,
    }


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("how", ["truncated", "missing", "flipped"])
async def test_damaged_checkpoint_raises_one_plain_error(
    tmp_path: Path, fmt: str, how: str
) -> None:
    await _write(tmp_path, fmt)
    _damage(tmp_path, "ckpt-1", how)
    for name, call in (await _entry_points(tmp_path)).items():
        raised = await _raised(call)
        if raised is not None:
            _is_plain(raised)
        elif how != "flipped" or (fmt != "safetensors" and "keys=" not in name):
            # (No checksums in safetensors; a part of a tensor is read without its CRC.)
            pytest.fail(f"{name}: no error from a {how} checkpoint ({fmt})")


async def _raised(call: Callable[[], Awaitable[Any]]) -> BaseException | None:
    try:
        await call()
    except BaseException as exc:  # what is raised is the test
        return exc
    return None


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_garbage_index_raises_one_plain_error(tmp_path: Path, fmt: str) -> None:
    await _write(tmp_path, fmt)
    metadata = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-1")]
    for path in metadata:
        if path.name.endswith(".index") or len(metadata) == 1 or fmt == "v1":
            path.write_bytes(b"\x00garbage" * 7)
    for name, call in (await _entry_points(tmp_path)).items():
        with pytest.raises(BaseException) as info:  # noqa: PT011 - checked below
            await call()
        _is_plain(info.value), name


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_an_index_out_of_range_raises_one_plain_error(tmp_path: Path, fmt: str) -> None:
    """``restore(keys={name: index})`` with an index past every tensor's end: the reader's
    own error, as ``reader.read`` raises it."""
    await _write(tmp_path, fmt)
    keys = list(_state())
    async with anyckpt.open(tmp_path / "ckpt-1") as reader:
        with pytest.raises(Exception) as direct:  # noqa: PT011 - compared below
            await reader.read(keys[0], (100,))
    _is_plain(direct.value)
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        with pytest.raises(type(direct.value)) as info:
            await manager.restore(keys=dict.fromkeys(keys, (100,)))
    _is_plain(info.value)
    with (
        anyckpt.sync.CheckpointManager(tmp_path) as manager,
        pytest.raises(type(direct.value)) as info,
    ):
        manager.restore(keys=dict.fromkeys(keys, (100,)))
    _is_plain(info.value)


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_sync_entry_points_raise_one_plain_error(tmp_path: Path, how: str) -> None:
    anyckpt.sync.save(tmp_path / "ckpt-1", _state(), options={"num_shards": 3})
    with anyckpt.sync.CheckpointManager(tmp_path / "run") as manager:
        manager.save(_state(), step=1).wait()
    _damage(tmp_path, "ckpt-1", how)
    _damage(tmp_path / "run", "ckpt-1", how)
    calls: dict[str, Callable[[], Any]] = {
        "sync.load": lambda: anyckpt.sync.load(tmp_path / "ckpt-1"),
        "sync.open.read_many": lambda: _sync_read_many(tmp_path / "ckpt-1"),
        "sync manager.restore": lambda: _sync_restore(tmp_path / "run"),
    }
    for name, call in calls.items():
        with pytest.raises(BaseException) as info:  # noqa: PT011 - checked below
            call()
        _is_plain(info.value), name


def _sync_read_many(prefix: os.PathLike[str]) -> Any:
    with anyckpt.sync.open(prefix) as reader:
        return reader.read_many()


def _sync_restore(directory: Path) -> Any:
    with anyckpt.sync.CheckpointManager(directory) as manager:
        return manager.restore()

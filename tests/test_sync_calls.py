"""The blocking one-shot calls (``anyckpt.sync.load``, ``save``...) run the async code on the
calling thread when it runs no event loop, and on a portal's thread when it does (sync code
called from a coroutine, as in a notebook cell): both give the same results and errors.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest
import trio

import anyckpt
import anyckpt.sync
from anyckpt import api


def _state() -> dict[str, np.ndarray]:
    return {"a/w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([b"x", b"yz"])}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


def _threads_used_by_load(prefix: Path, monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The threads ``anyckpt.sync.load`` ran ``api.load``'s coroutine on."""
    seen: set[int] = set()
    real = api.load

    async def spying(*args: object, **kwargs: object) -> object:
        seen.add(threading.get_ident())
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "load", spying)
    _same(anyckpt.sync.load(prefix), _state())
    return seen


def test_without_an_event_loop_the_call_runs_on_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    anyckpt.sync.save(tmp_path / "c", _state(), durable=False)
    assert _threads_used_by_load(tmp_path / "c", monkeypatch) == {threading.get_ident()}


def test_inside_a_running_asyncio_loop_the_call_uses_another_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    anyckpt.sync.save(tmp_path / "c", _state(), durable=False)
    seen: set[int] = set()

    async def cell() -> int:  # a notebook cell: blocking code on the loop's thread
        seen.update(_threads_used_by_load(tmp_path / "c", monkeypatch))
        return threading.get_ident()

    loop_thread = asyncio.run(cell())
    assert seen
    assert loop_thread not in seen


def test_inside_a_running_trio_loop_the_call_uses_another_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    anyckpt.sync.save(tmp_path / "c", _state(), durable=False)
    seen: set[int] = set()

    async def task() -> int:
        seen.update(_threads_used_by_load(tmp_path / "c", monkeypatch))
        return threading.get_ident()

    loop_thread = trio.run(task)
    assert seen
    assert loop_thread not in seen


@pytest.mark.parametrize("backend", ["none", "asyncio"])
def test_errors_are_the_same_on_either_path(tmp_path: Path, backend: str) -> None:
    anyckpt.sync.save(tmp_path / "c", _state(), durable=False)

    def calls() -> list[str]:
        errors = []
        for call in (
            lambda: anyckpt.sync.load(tmp_path / "missing"),
            lambda: anyckpt.sync.load(tmp_path / "c", ["nope"]),
            lambda: anyckpt.sync.save(tmp_path / "d", {"x": object()}),
        ):
            with pytest.raises(Exception) as info:  # noqa: PT011 - compared below
                call()
            errors.append(f"{type(info.value).__name__}: {info.value}")
        return errors

    if backend == "none":
        got = calls()
    else:

        async def cell() -> list[str]:
            return calls()

        got = asyncio.run(cell())
    assert got[0].startswith("CheckpointNotFoundError")
    assert got[1].startswith("KeyError")
    assert "'x'" in got[2]
    assert not (tmp_path / "d.index").exists()


def test_a_sync_call_after_an_async_one_in_the_same_thread(tmp_path: Path) -> None:
    """anyio.run on the calling thread leaves nothing behind for the next loop."""
    anyckpt.sync.save(tmp_path / "c", _state(), durable=False)

    async def main() -> dict[str, np.ndarray]:
        return await anyckpt.load(tmp_path / "c")

    _same(anyio.run(main), _state())
    _same(anyckpt.sync.load(tmp_path / "c"), _state())
    _same(anyio.run(main, backend="trio"), _state())
    _same(anyckpt.sync.load(tmp_path / "c", ["a/w"]), {"a/w": _state()["a/w"]})

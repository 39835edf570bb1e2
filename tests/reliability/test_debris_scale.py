"""A state file tracking 100,000 checkpoints, and debris beside it (issue 13, defect 4).

Opening a manager (debris cleanup), its first save (the first sweep deletes 99,998 tracked
checkpoints long gone from disk), ``anyckpt ls`` and ``anyckpt prune --dry-run`` must cost
work linear in the state file and the directory, not their product. The bound is on the
number of operations, not on time: every storage call anyckpt makes and every name a listing
returns are counted, and so is every line of anyckpt's directory-handling code executed (a
trace function on the manager and the CLI's ``ls``, ``prune`` and their scan). Each counter
stops the run with an AssertionError the moment it passes its bound, so a quadratic version
fails quickly instead of running for minutes.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import numpy as np
import pytest

import anyckpt
import anyckpt.cli
from anyckpt import CheckpointManager
from anyckpt.codecs.state_file import CheckpointState, encode_state
from anyckpt.storage import Storage

TRACKED = 100_000
#: Debris: data files without their index, half at tracked steps, half newer than the latest.
DEBRIS = 2_000
#: Storage calls allowed per file on disk (plus a constant), whatever the state file tracks.
CALLS_PER_FILE = 12
#: Names returned by listings, per file on disk.
LISTED_PER_FILE = 30
#: Lines of anyckpt's directory code executed per tracked name or file.
LINES_PER_ITEM = 80

_SRC = str(Path(anyckpt.__file__).parent)
_TRACED = tuple(
    os.path.join(_SRC, *part)
    for part in (
        ("manager", ""),  # the package: core, directory, ... (a prefix)
        ("formats", "layout.py"),
        ("cli", "_scan.py"),
        ("cli", "_prune.py"),
        ("cli", "_ls.py"),
    )
)
_COUNTED = (
    "listdir",
    "listdir_prefixed",
    "exists",
    "open_reader",
    "read_bytes",
    "read_versioned",
    "remove",
    "write_bytes",
    "replace_if",
    "create_exclusive",
    "open_writer",
)


class _Budget:
    def __init__(self, calls: int, listed: int, lines: int) -> None:
        self.limits = {"calls": calls, "listed": listed, "lines": lines}
        self.used = dict.fromkeys(self.limits, 0)
        self.lines = [0]  # counted by the trace function (hot: no lock)
        self._guard = threading.Lock()

    def spend(self, what: str, amount: int = 1) -> None:
        with self._guard:
            self.used[what] += amount
            if self.used[what] > self.limits[what]:
                raise AssertionError(f"over budget: {self.used[what]} {what} > {self.limits}")


@contextlib.contextmanager
def _counted(monkeypatch: pytest.MonkeyPatch, budget: _Budget) -> Iterator[None]:
    for name in _COUNTED:
        real = getattr(Storage, name, None)
        if real is None:
            continue

        def counting(self: Storage, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            budget.spend("calls")
            out = _real(self, *args, **kwargs)
            if isinstance(out, list):
                budget.spend("listed", len(out))
            return out

        monkeypatch.setattr(Storage, name, counting)

    lines, limit = budget.lines, budget.limits["lines"]

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        lines[0] += 1  # (every event of a traced frame: its lines, calls and returns)
        if lines[0] > limit:
            raise AssertionError(f"over budget: {lines[0]} lines > {limit}")
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(_TRACED) else None

    sys.settrace(tracer)
    threading.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        monkeypatch.undo()


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state file (100,000 tracked names, the newest one on disk) and the debris."""
    directory = tmp_path_factory.mktemp("crowded")
    anyckpt.sync.save(str(directory / f"ckpt-{TRACKED}"), {"x": np.arange(3)})
    now = time.time()
    names = [f"ckpt-{i}" for i in range(1, TRACKED + 1)]
    stamps = [now - 10_000 + i * 1e-3 for i in range(TRACKED)]
    state = CheckpointState(names[-1], names, stamps, now - 20_000)
    (directory / "checkpoint").write_bytes(encode_state(state))
    for j in range(DEBRIS):
        step = j * 37 + 1 if j % 2 else TRACKED + 1 + j
        (directory / f"ckpt-{step}.data-00000-of-00001").write_bytes(b"x")
    return directory


def _budget(files: int, names: int) -> _Budget:
    return _Budget(
        calls=CALLS_PER_FILE * files + 200,
        listed=LISTED_PER_FILE * files + 1000,
        lines=LINES_PER_ITEM * (names + files) + 100_000,
    )


def _files(directory: Path) -> int:
    return len(os.listdir(directory))


@pytest.mark.parametrize("argv", [["ls"], ["prune", "--dry-run"]])
def test_cli_on_a_crowded_directory_is_linear(
    crowded: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = _budget(_files(crowded), TRACKED)
    with (
        _counted(monkeypatch, budget),
        contextlib.redirect_stdout(io.StringIO()) as out,
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = anyckpt.cli.main([*argv, str(crowded)])
    text = out.getvalue() + err.getvalue()
    assert "internal error" not in text, text
    assert code == 0, text
    if argv[0] == "prune":
        assert f"would delete {TRACKED - 5} checkpoints" in text
        assert f"and {DEBRIS} leftover files" in text
    assert budget.used["calls"] > 0  # the counters saw the work
    assert budget.lines[0] > 0  # and the trace saw the directory code (the paths are right)


def test_open_and_first_save_on_a_crowded_directory_are_linear(
    crowded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    for name in os.listdir(crowded):
        (directory / name).write_bytes((crowded / name).read_bytes())
    budget = _budget(_files(directory), TRACKED)

    async def open_and_save() -> list[str]:
        async with CheckpointManager(str(directory), max_to_keep=2, durable=False) as manager:
            pending = await manager.save({"x": np.arange(3)}, step=TRACKED + DEBRIS + 10)
            await pending
            assert pending.event is not None
            return list(pending.event.deleted)

    with _counted(monkeypatch, budget):
        deleted = anyio.run(open_and_save)
    assert len(deleted) == TRACKED - 1  # all but the newest tracked and the new one
    assert budget.lines[0] > 0  # the trace saw the manager's directory code
    assert sorted(os.listdir(directory)) == sorted(
        [
            "checkpoint",
            f"ckpt-{TRACKED}.index",
            f"ckpt-{TRACKED}.data-00000-of-00001",
            f"ckpt-{TRACKED + DEBRIS + 10}.index",
            f"ckpt-{TRACKED + DEBRIS + 10}.data-00000-of-00001",
        ]
    )

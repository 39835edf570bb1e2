"""Links and other files planted in a checkpoint directory (issue 13, defects 1 and 8).

An attacker who can write the directory plants, under a name anyckpt writes or deletes (the
lock file, the ``checkpoint`` state file, a temporary name, a checkpoint's index), a symbolic
link to a file outside, a hard link to one, a dangling link, a link to ``/dev/null``, or a
directory. Opening a manager and saving, ``anyckpt prune`` and ``anyckpt prune --dry-run``
must either refuse with anyckpt's own error or go on, and in every case change nothing
outside the directory: the outside file keeps its bytes and its mtime, a dangling link's
target is never created.

Reading: a data file that is a symbolic link leaving the directory is refused (UnsafePathError)
by load, open, a manager's restore and ``anyckpt verify``, unless ``allow_symlinks=True``
(``--allow-symlinks``); a link staying inside the directory is read as its target.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import pytest

import anyckpt
import anyckpt.cli
import anyckpt.storage.local
from anyckpt import (
    CheckpointError,
    CheckpointManager,
    ConcurrentWriterError,
    CorruptCheckpointError,
    UnsafePathError,
)
from anyckpt.codecs.state_file import CheckpointState, encode_state
from anyckpt.lease import LOCK_FILE
from anyckpt.storage import TEMP_MARKER

OUTSIDE_BYTES = b"precious outside data\n" * 8


def _values(step: int) -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32) + step, "b": np.full(3, step, dtype=np.int64)}


def _run_dir(tmp_path: Path, steps: int = 3) -> tuple[Path, Path]:
    """A run directory with ``steps`` committed checkpoints, and an outside directory holding
    the file an attacker aims at."""
    directory, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(OUTSIDE_BYTES)
    os.utime(outside / "victim", (1_000_000_000, 1_000_000_000))

    async def save() -> None:
        async with CheckpointManager(str(directory), max_to_keep=None) as manager:
            for step in range(1, steps + 1):
                await (await manager.save(_values(step), step=step))

    anyio.run(save)
    return directory, outside


def _plant(kind: str, at: Path, outside: Path) -> Callable[[], None]:
    """Plant ``kind`` at ``at`` (replacing what is there); return a check that nothing
    outside the directory changed."""
    victim = outside / "victim"
    if at.is_dir() and not at.is_symlink():
        shutil.rmtree(at)
    elif at.exists() or at.is_symlink():
        at.unlink()
    if kind == "symlink":
        at.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, at)
    elif kind == "dangling":
        at.symlink_to(outside / "created-by-anyckpt")
    elif kind == "devnull":
        at.symlink_to("/dev/null")
    elif kind == "directory":
        at.mkdir()
    else:  # pragma: no cover
        raise AssertionError(kind)
    stat = victim.stat()

    def unchanged() -> None:
        assert victim.read_bytes() == OUTSIDE_BYTES
        now = victim.stat()
        assert (now.st_mtime_ns, now.st_size) == (stat.st_mtime_ns, stat.st_size)
        assert not (outside / "created-by-anyckpt").exists()
        assert sorted(p.name for p in outside.iterdir()) == ["victim"]

    return unchanged


async def _open_and_save(directory: Path, step: int) -> None:
    async with CheckpointManager(str(directory), max_to_keep=2) as manager:
        await (await manager.save(_values(step), step=step))


def _cli(*argv: str) -> tuple[int, str]:
    with (
        contextlib.redirect_stdout(io.StringIO()) as out,
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = anyckpt.cli.main(list(argv))
    return code, out.getvalue() + err.getvalue()


KINDS = ["symlink", "hardlink", "dangling", "devnull", "directory"]


# -- fixed names written in place or replaced -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_planted_lock_file_is_refused_and_nothing_outside_changes(
    kind: str, tmp_path: Path
) -> None:
    directory, outside = _run_dir(tmp_path)
    unchanged = _plant(kind, directory / LOCK_FILE, outside)
    with pytest.raises(UnsafePathError, match="lock file") as raised:
        anyio.run(_open_and_save, directory, 10)
    assert LOCK_FILE in str(raised.value)
    unchanged()
    code, text = _cli("prune", "--max-to-keep", "1", str(directory))
    assert code != 0, text
    assert "refusing to use this lock file" in text, text
    assert "internal error" not in text
    unchanged()
    code, text = _cli("prune", "--dry-run", "--max-to-keep", "1", str(directory))
    assert code == 0, text  # changes nothing, takes no lock
    unchanged()
    assert sorted(p.name for p in directory.glob("ckpt-*.index")) == [
        "ckpt-1.index",
        "ckpt-2.index",
        "ckpt-3.index",
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_planted_state_file_is_refused_and_nothing_outside_changes(
    kind: str, tmp_path: Path
) -> None:
    directory, outside = _run_dir(tmp_path)
    unchanged = _plant_state(kind, directory, outside)
    if kind == "hardlink":
        # A hard link is replaced by the rename, never written through: the save goes on.
        anyio.run(_open_and_save, directory, 10)
        assert anyckpt.sync.latest_checkpoint(str(directory)).endswith("ckpt-10")
    else:
        # A directory is a damaged state file; a link of any kind is refused.
        expected = CorruptCheckpointError if kind == "directory" else UnsafePathError
        with pytest.raises(CheckpointError) as raised:
            anyio.run(_open_and_save, directory, 10)
        assert f"{directory}/checkpoint:" in str(raised.value)
        assert type(raised.value) is expected, raised.value
    unchanged()
    for argv in (["prune", "--max-to-keep", "1"], ["prune", "--dry-run", "--max-to-keep", "1"]):
        code, text = _cli(*argv, str(directory))
        assert "internal error" not in text, text
        if kind != "hardlink":
            assert code != 0, text
        unchanged()


def _plant_state(kind: str, directory: Path, outside: Path) -> Callable[[], None]:
    victim = outside / "victim"
    if kind in ("symlink", "hardlink"):
        victim.write_bytes(OUTSIDE_STATE)
        os.utime(victim, (1_000_000_000, 1_000_000_000))
    at = directory / "checkpoint"
    at.unlink()
    if kind == "symlink":
        at.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, at)
    elif kind == "dangling":
        at.symlink_to(outside / "created-by-anyckpt")
    elif kind == "devnull":
        at.symlink_to("/dev/null")
    else:
        at.mkdir()
    expected, stat = victim.read_bytes(), victim.stat()

    def unchanged() -> None:
        assert victim.read_bytes() == expected
        assert victim.stat().st_mtime_ns == stat.st_mtime_ns
        assert not (outside / "created-by-anyckpt").exists()

    return unchanged


#: A valid state file (of another run) an attacker links to.
OUTSIDE_STATE = encode_state(CheckpointState("ckpt-3", ("ckpt-2", "ckpt-3"), (1.0, 2.0), 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_links_planted_at_the_next_checkpoints_names_are_refused(kind: str, tmp_path: Path) -> None:
    """The index of a checkpoint about to be saved is replaced by a rename: a link or
    directory planted there is refused before the rename (a hard link is replaced, never
    written through). A manager removes what is planted at a future step's names as debris
    of an interrupted save (the link itself), then saves."""
    directory, outside = _run_dir(tmp_path)
    unchanged = _plant(kind, directory / "ckpt-10.index", outside)
    if kind == "hardlink":
        anyckpt.sync.save(str(directory / "ckpt-10"), _values(10))
        assert_restored(directory, 10)
    else:
        with pytest.raises(UnsafePathError, match=r"ckpt-10\.index"):
            anyckpt.sync.save(str(directory / "ckpt-10"), _values(10))
    unchanged()
    unchanged = _plant(kind, directory / "ckpt-10.index", outside)
    if kind == "directory":  # never removed (nor anything in it)
        with pytest.raises(UnsafePathError, match=r"ckpt-10\.index: a directory"):
            anyio.run(_open_and_save, directory, 10)
    else:
        anyio.run(_open_and_save, directory, 10)
        assert_restored(directory, 10)
    unchanged()


def assert_restored(directory: Path, step: int) -> None:
    got = anyckpt.sync.load(str(directory / f"ckpt-{step}"))
    for key, value in _values(step).items():
        np.testing.assert_array_equal(got[key], value)


@pytest.mark.parametrize("kind", KINDS)
def test_links_planted_at_predictable_temporary_names_are_skipped(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporary names are random; one an attacker guessed (here: made predictable) and
    planted is never written through: the writer takes the next name."""
    directory, outside = _run_dir(tmp_path)
    drawn: list[str] = []

    def token_hex(nbytes: int | None = None) -> str:
        # Every other name is the guessed one: each writer's first try collides.
        drawn.append("0" * 16 if len(drawn) % 2 == 0 else f"{len(drawn):016x}")
        return drawn[-1]

    monkeypatch.setattr(anyckpt.storage.local.secrets, "token_hex", token_hex)
    checks = [
        _plant(kind, directory / f"ckpt-10.data-00000-of-00001{TEMP_MARKER}{'0' * 16}", outside),
        _plant(kind, directory / f"ckpt-10.index{TEMP_MARKER}{'0' * 16}", outside),
    ]
    anyckpt.sync.save(str(directory / "ckpt-10"), _values(10))
    assert_restored(directory, 10)
    for unchanged in checks:
        unchanged()
    assert drawn.count("0" * 16) >= 2  # both planted names were drawn, and skipped


# -- deletions --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["save", "prune", "prune-dry-run"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dangling", "devnull"])
def test_deleting_a_planted_link_never_touches_its_target(
    how: str, kind: str, tmp_path: Path
) -> None:
    """``ckpt-1.index`` (tracked; retention deletes ckpt-1) replaced by a link: retention and
    debris cleanup delete the link itself, never the file it points to."""
    directory, outside = _run_dir(tmp_path)
    (outside / "victim").write_bytes(OUTSIDE_BYTES)
    unchanged = _plant(kind, directory / "ckpt-1.index", outside)
    debris = directory / "ckpt-1.data-00000-of-00001"
    if how == "save":
        anyio.run(_open_and_save, directory, 10)  # max_to_keep=2: ckpt-1 and ckpt-2 go
        assert not (directory / "ckpt-1.index").is_symlink()
        assert not (directory / "ckpt-1.index").exists()
        assert not debris.exists()
    elif how == "prune":
        code, text = _cli("prune", "--max-to-keep", "1", str(directory))
        assert code == 0, text
        assert not (directory / "ckpt-1.index").is_symlink()
        assert not (directory / "ckpt-1.index").exists()
    else:
        code, text = _cli("prune", "--dry-run", "--max-to-keep", "1", str(directory))
        assert code == 0, text
        assert (directory / "ckpt-1.index").is_symlink() or kind == "hardlink"
    unchanged()


# -- reading: data files that are links --------------------------------------------------------


def _link_data_outside(tmp_path: Path) -> tuple[Path, Path]:
    """ckpt-3's data file moved outside and replaced by a symbolic link to it."""
    directory, outside = _run_dir(tmp_path)
    data = directory / "ckpt-3.data-00000-of-00001"
    moved = outside / data.name
    shutil.move(data, moved)
    data.symlink_to(moved)
    return directory, moved


def test_data_file_linked_outside_is_refused_unless_allowed(tmp_path: Path) -> None:
    directory, moved = _link_data_outside(tmp_path)
    prefix = str(directory / "ckpt-3")
    with pytest.raises(UnsafePathError, match="outside the checkpoint's directory") as raised:
        anyckpt.sync.load(prefix)
    assert "ckpt-3.data-00000-of-00001" in str(raised.value)
    with pytest.raises(UnsafePathError), anyckpt.sync.open(prefix) as reader:
        reader.read_many()

    async def restore(**kwargs: bool) -> dict[str, np.ndarray]:
        async with CheckpointManager(str(directory), max_to_keep=None, **kwargs) as manager:
            return await manager.restore(3)

    with pytest.raises(UnsafePathError):
        anyio.run(restore)
    # Opted in: read as usual.
    for got in (
        anyckpt.sync.load(prefix, allow_symlinks=True),
        anyio.run(restore_allowed, directory),
    ):
        for key, value in _values(3).items():
            np.testing.assert_array_equal(got[key], value)
    assert moved.exists()


async def restore_allowed(directory: Path) -> dict[str, np.ndarray]:
    async with CheckpointManager(str(directory), max_to_keep=None, allow_symlinks=True) as m:
        return await m.restore(3)


def test_verify_refuses_a_data_file_linked_outside(tmp_path: Path) -> None:
    directory, _ = _link_data_outside(tmp_path)
    code, text = _cli("verify", str(directory / "ckpt-3"))
    assert code != 0, text
    assert "outside the checkpoint's directory" in text, text
    code, text = _cli("verify", str(directory))
    assert code != 0, text
    assert "ckpt-3" in text, text
    assert "outside" in text, text
    code, text = _cli("verify", "--allow-symlinks", str(directory / "ckpt-3"))
    assert code == 0, text


def test_links_inside_the_directory_are_read(tmp_path: Path) -> None:
    """A data file linked to another file of the same directory (or a sub-directory) is
    inside: read without any option."""
    directory, _ = _run_dir(tmp_path)
    data = directory / "ckpt-3.data-00000-of-00001"
    (directory / "blobs").mkdir()
    shutil.move(data, directory / "blobs" / "three")
    data.symlink_to(Path("blobs") / "three")
    assert_restored(directory, 3)
    code, text = _cli("verify", str(directory / "ckpt-3"))
    assert code == 0, text


def test_concurrent_writer_error_is_still_raised_for_a_held_lock(tmp_path: Path) -> None:
    """The checks of the lock file do not get in the way of the lock itself."""
    directory, _ = _run_dir(tmp_path)

    async def both() -> None:
        async with CheckpointManager(str(directory)):
            with pytest.raises(ConcurrentWriterError):
                async with CheckpointManager(str(directory)):
                    pass

    anyio.run(both)

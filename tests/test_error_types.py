"""Hostile files raise anyckpt's own errors, naming the file (issue 13, defect 6).

An index entry NumPy cannot shape (``[0, 2**62, 2**62]``: empty, yet "array is too big" to
NumPy), and a directory or FIFO planted where a checkpoint file, the ``checkpoint`` state
file or a ``.meta`` belongs, give CorruptCheckpointError naming that file through load, open,
a manager and the CLI (inspect, verify, diff, convert, prune), never NumPy's ValueError or
IsADirectoryError. A user's own OSError (permissions, a full disk) stays an OSError.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
import anyckpt.cli
import anyckpt.storage.local
from anyckpt import CheckpointManager, CorruptCheckpointError
from anyckpt.codecs.bundle import BundleEntry, encode_entry, encode_header
from anyckpt.codecs.crc import masked_crc32c
from anyckpt.codecs.table import build_table

EMPTY_BUT_HUGE = (0, 1 << 62, 1 << 62)


def _crafted(prefix: Path, shape: tuple[int, ...], dtype: int = 1) -> None:
    entry = BundleEntry(dtype, shape, size=0, crc32c=masked_crc32c(b""))
    table = build_table([(b"", encode_header(1)), (b"w", encode_entry(entry))])
    Path(f"{prefix}.index").write_bytes(table)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(b"")


def _cli(*argv: str) -> tuple[int, str]:
    with (
        contextlib.redirect_stdout(io.StringIO()) as out,
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = anyckpt.cli.main(list(argv))
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("dtype", [1, 7])  # float32, string
def test_an_empty_tensor_numpy_cannot_shape_is_corrupt(tmp_path: Path, dtype: int) -> None:
    prefix = tmp_path / "z"
    _crafted(prefix, EMPTY_BUT_HUGE, dtype)
    index = f"{prefix}.index"

    def partial() -> Any:
        with anyckpt.sync.open(str(prefix)) as reader:
            return reader.read("w", index=(slice(0, 0),))

    def spec() -> Any:
        with anyckpt.sync.open(str(prefix)) as reader:
            return reader.spec("w")

    def keys() -> Any:
        with anyckpt.sync.open(str(prefix)) as reader:
            return reader.keys()

    uses = [lambda: anyckpt.sync.load(str(prefix)), lambda: anyckpt.sync.load(str(prefix), ["w"])]
    for use in (*uses, partial, spec, keys):
        with pytest.raises(CorruptCheckpointError, match="too big for NumPy") as raised:
            use()
        assert raised.value.path == index
    for argv in (
        ["inspect", str(prefix)],
        ["verify", str(prefix)],
        ["verify", str(tmp_path)],
        ["diff", str(prefix), str(prefix)],
        ["convert", str(prefix), str(tmp_path / "out")],
    ):
        code, text = _cli(*argv)
        assert code == 1, (argv, text)
        assert "too big for NumPy" in text, (argv, text)
        assert "internal error" not in text


def test_an_ordinary_empty_tensor_still_reads(tmp_path: Path) -> None:
    """Control: an empty tensor NumPy can shape reads as such."""
    prefix = tmp_path / "z"
    _crafted(prefix, (0, 1 << 20, 3))
    assert anyckpt.sync.load(str(prefix))["w"].shape == (0, 1 << 20, 3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 1 << 62), min_size=0, max_size=4),
    st.integers(0, 4),
    st.sampled_from(["float32", "float64", "complex128", "int8", "object"]),
)
def test_numpy_can_shape_says_what_numpy_does(
    dims: list[int], zero_at: int, dtype_name: str
) -> None:
    """Shapes with a zero dimension allocate nothing, so NumPy itself is the oracle."""
    from anyckpt.codecs.dtypes import numpy_can_shape

    shape = (*dims[:zero_at], 0, *dims[zero_at:])
    dtype = np.dtype(dtype_name)
    try:
        np.empty(shape, dtype=dtype)
        made = True
    except ValueError:
        made = False
    assert numpy_can_shape(shape, dtype.itemsize) == made


# -- directories and FIFOs where files belong --------------------------------------------------


def _run(directory: Path) -> None:
    async def save() -> None:
        async with CheckpointManager(str(directory), max_to_keep=None) as manager:
            for step in (1, 2):
                await (await manager.save({"x": np.arange(4) + step}, step=step))

    anyio.run(save)


def _plant(at: Path, kind: str) -> None:
    at.unlink()
    if kind == "directory":
        at.mkdir()
        (at / "inside").write_bytes(b"keep me")
    else:
        os.mkfifo(at)


async def _open_manager(directory: Path) -> None:
    async with CheckpointManager(str(directory), max_to_keep=None):
        pass


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.parametrize("name", ["ckpt-2.index", "ckpt-2.data-00000-of-00001"])
def test_a_checkpoint_file_that_is_not_a_file_is_corrupt(
    tmp_path: Path, name: str, kind: str
) -> None:
    directory = tmp_path / "run"
    _run(directory)
    _plant(directory / name, kind)
    path = str(directory / name)
    what = "a directory" if kind == "directory" else "a FIFO"
    with pytest.raises(CorruptCheckpointError, match=what) as raised:
        anyckpt.sync.load(str(directory / "ckpt-2"))
    assert raised.value.path == path

    async def restore() -> None:
        async with CheckpointManager(str(directory), max_to_keep=None) as manager:
            await manager.restore(2)

    with pytest.raises(CorruptCheckpointError) as raised:
        anyio.run(restore)
    assert raised.value.path == path
    commands = [["verify", str(directory)]]
    if name.endswith(".index"):  # inspect without --values reads no data file (docs/cli.md)
        commands.append(["inspect", str(directory / "ckpt-2")])
    for argv in commands:
        code, text = _cli(*argv)
        assert code == 1, text
        assert f"{path}: {what}, not a regular file" in text, text
    if kind == "directory":
        assert (directory / name / "inside").read_bytes() == b"keep me"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_state_file_that_is_not_a_file_is_corrupt(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "run"
    _run(directory)
    _plant(directory / "checkpoint", kind)
    path = str(directory / "checkpoint")
    with pytest.raises(CorruptCheckpointError) as raised:
        anyio.run(_open_manager, directory)
    assert raised.value.path == path
    with pytest.raises(CorruptCheckpointError) as raised:
        anyckpt.sync.latest_checkpoint(str(directory))
    assert raised.value.path == path
    for argv in (["verify", str(directory)], ["prune", "--dry-run", str(directory)]):
        code, text = _cli(*argv)
        assert code == 1, text
        assert path in text, text
        assert ("a directory" if kind == "directory" else "a FIFO") in text, text
    code, text = _cli("ls", str(directory))
    assert code == 0, text
    assert "unreadable" in text, text


def test_a_meta_that_is_not_a_file_is_corrupt(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt-1"
    anyckpt.sync.save(str(prefix), {"x": np.arange(3)}, write_meta_graph=True)
    meta = Path(f"{prefix}.meta")
    _plant(meta, "directory")
    with pytest.raises(CorruptCheckpointError, match="a directory") as raised:
        anyckpt.sync.read_meta_graph(str(prefix))
    assert raised.value.path == str(meta)
    code, text = _cli("inspect", str(prefix))
    assert code == 1, text
    assert "internal error" not in text


def test_a_prefix_under_a_file_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        anyckpt.sync.load(str(tmp_path / "file" / "ckpt-1"))


def test_a_users_own_oserror_stays_an_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permissions (or a full disk) are the user's to fix, not damage: raised as they are."""
    prefix = tmp_path / "ckpt-1"
    anyckpt.sync.save(str(prefix), {"x": np.arange(3)})
    real_open = os.open

    def deny(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".data-00000-of-00001"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(anyckpt.storage.local.os, "open", deny)
    with pytest.raises(PermissionError) as raised:
        anyckpt.sync.load(str(prefix))
    assert not isinstance(raised.value, anyckpt.CheckpointError)

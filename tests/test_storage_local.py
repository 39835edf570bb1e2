"""The local writer's fast paths (early writeback of durable files, reserved blocks) and the
reader's one-call read."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from anyckpt.errors import CorruptCheckpointError
from anyckpt.storage import Storage, start_writeback
from anyckpt.storage import local as storage_module


@pytest.mark.parametrize("durable", [True, False])
def test_durable_writes_start_writeback_in_consecutive_stretches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(storage_module, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(
        storage_module, "start_writeback", lambda fd, off, n: calls.append((off, n)) or True
    )
    arrays = [np.arange(n, dtype=np.float64) for n in (10, 200, 0, 300, 7)]
    storage, path = Storage.from_url(str(tmp_path / "f"))
    writer = storage.open_writer(path, durable=durable)
    writer.write_many(arrays[:3])
    writer.write(arrays[3])
    writer.write_many(arrays[4:])
    writer.commit()
    assert (tmp_path / "f").read_bytes() == b"".join(a.tobytes() for a in arrays)
    if not durable:
        assert calls == []
        return
    # Every stretch starts where the last ended, is at least 1000 bytes, and none is skipped.
    assert calls == [(0, 1680), (1680, 2400)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_on_a_real_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 10000)
        assert start_writeback(fd, 0, 10000) is True
        assert start_writeback(fd, 0, 0) is False  # nothing to do
    finally:
        os.close(fd)
    assert start_writeback(fd, 0, 10) is False  # a closed descriptor: refused, no exception


def test_reader_read_is_the_bytes_and_refuses_past_the_end_and_a_shrunk_file(
    tmp_path: Path,
) -> None:
    """``read`` (one ``pread``) returns exactly the bytes asked for; a range past the end is
    refused before reading, and a file that shrank after it was opened takes the general loop,
    which names it."""
    path = tmp_path / "f"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    storage, where = Storage.from_url(str(path))
    reader = storage.open_reader(where)
    try:
        assert reader.read(0, len(data)) == data
        assert reader.read(100, 0) == b""
        assert reader.read(1000, 3000) == data[1000:4000]
        for offset, length in [(len(data) - 1, 2), (-1, 1), (0, len(data) + 1)]:
            with pytest.raises(CorruptCheckpointError, match="past the end"):
                reader.read(offset, length)
        os.truncate(path, 4096)  # the size seen at open is no longer there
        with pytest.raises(CorruptCheckpointError, match="shrank"):
            reader.read(0, len(data))
    finally:
        reader.close()

"""The local writer's fast paths: early writeback of durable files, reserved blocks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

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

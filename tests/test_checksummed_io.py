"""formats/_checksummed_io: chunked write/read with the CRC-32C on a second thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyckpt.codecs.crc import masked_crc32c
from anyckpt.formats._checksummed_io import (
    CHUNK_BYTES,
    read_checksummed,
    write_checksummed,
)
from anyckpt.storage import preallocate


class RecordingPool(Executor):
    """A one-thread pool that keeps every future it hands out, and can make the n-th task
    (0-based) raise instead of running."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="test-crc")
        self.futures: list[Future[Any]] = []
        self.threads: set[int] = set()
        self._fail_at = fail_at
        self._delay = delay

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        index = len(self.futures)

        def task() -> Any:
            self.threads.add(threading.get_ident())
            time.sleep(self._delay)
            if index == self._fail_at:
                raise RuntimeError(f"checksum task {index} failed")
            return fn(*args, **kwargs)

        future = self._pool.submit(task)
        self.futures.append(future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    p = RecordingPool()
    yield p
    p.shutdown()


def _chunks(size: int, chunk: int) -> list[int]:
    return [min(chunk, size - start) for start in range(0, size, chunk)]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), chunk=st.integers(1, 130))
def test_write_crc_and_bytes(data: bytes, chunk: int) -> None:
    written: list[bytes] = []
    with ThreadPoolExecutor(1) as pool:
        crc = write_checksummed(
            lambda v: written.append(bytes(v)), memoryview(data), pool, chunk
        ).result()
    assert crc == masked_crc32c(data)
    assert b"".join(written) == data
    assert [len(w) for w in written] == _chunks(len(data), chunk)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=600),
    chunk=st.integers(1, 130),
    before=st.integers(0, 40),
    after=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_read_crc_and_bytes(data: bytes, chunk: int, before: int, after: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    file = rng.bytes(before) + data + rng.bytes(after)
    calls: list[tuple[int, int]] = []

    def read_into(offset: int, view: memoryview) -> None:
        calls.append((offset, view.nbytes))
        view[:] = file[offset : offset + view.nbytes]

    dest = bytearray(len(data))
    with ThreadPoolExecutor(1) as pool:
        crc = read_checksummed(read_into, before, memoryview(dest), pool, chunk).result()
    assert crc == masked_crc32c(data)
    assert bytes(dest) == data
    sizes = _chunks(len(data), chunk)
    assert calls == [(before + sum(sizes[:i]), n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_checksums_trail_by_at_most_lag_chunks(lag: int) -> None:
    """When chunk k is written, the checksums of chunks before k - lag are done; when chunk
    k is read, those before k - 1 - lag (chunk k - 1's may run during the read). The
    checksums are slowed down, so only waiting for them gets them done in time."""
    pool = RecordingPool(delay=0.002)
    data = memoryview(bytes(range(256)) * 40)
    seen: list[list[bool]] = []
    write_checksummed(lambda v: seen.append([f.done() for f in pool.futures]), data, pool, 100, lag)
    for k, done in enumerate(seen):
        assert len(done) == k + 1
        assert all(done[: max(0, k - lag)])
    pool.futures.clear()
    seen.clear()
    read_checksummed(
        lambda o, v: seen.append([f.done() for f in pool.futures]),
        0,
        memoryview(bytearray(data.nbytes)),
        pool,
        100,
        lag,
    )
    for k, done in enumerate(seen):
        assert len(done) == k
        assert all(done[: max(0, k - 1 - lag)])
    pool.shutdown()


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=300), chunk=st.integers(1, 40), lag=st.integers(0, 5))
def test_any_lag_same_crc(data: bytes, chunk: int, lag: int) -> None:
    with ThreadPoolExecutor(2) as pool:  # two workers: chained tasks may wait on each other
        crc = write_checksummed(lambda v: None, memoryview(data), pool, chunk, lag).result()
        dest = bytearray(len(data))

        def read_into(offset: int, view: memoryview) -> None:
            view[:] = data[offset : offset + view.nbytes]

        assert read_checksummed(read_into, 0, memoryview(dest), pool, chunk, lag).result() == crc
    assert crc == masked_crc32c(data)


def test_crc_runs_on_the_pool(pool: RecordingPool) -> None:
    data = memoryview(np.arange(1000, dtype=np.uint8).tobytes())
    write_checksummed(lambda v: None, data, pool, 100)
    assert len(pool.futures) == 10
    assert threading.get_ident() not in pool.threads


@pytest.mark.parametrize("shape", [(3, 5, 7), (64, 1024)])
def test_typed_multidimensional_views(pool: RecordingPool, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    written = bytearray()
    crc = write_checksummed(written.extend, memoryview(array), pool, 1000).result()
    assert crc == masked_crc32c(array.tobytes())
    assert bytes(written) == array.tobytes()

    out = np.empty_like(array)
    raw = bytes(written)

    def read_into(offset: int, view: memoryview) -> None:
        view[:] = raw[offset : offset + view.nbytes]

    assert read_checksummed(read_into, 0, memoryview(out), pool, 1000).result() == crc
    np.testing.assert_array_equal(out, array)


def test_real_file_round_trip(tmp_path: Path, pool: RecordingPool) -> None:
    array = np.random.default_rng(2).standard_normal(3 * CHUNK_BYTES // 8 + 3)  # float64
    path = tmp_path / "data"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"head")
        preallocate(fd, 4, array.nbytes)

        def write(view: memoryview) -> None:
            while view.nbytes:
                view = view[os.write(fd, view) :]

        crc = write_checksummed(write, memoryview(array), pool).result()
    finally:
        os.close(fd)
    assert crc == masked_crc32c(array.tobytes())
    assert path.read_bytes() == b"head" + array.tobytes()

    out = np.empty_like(array)
    fd = os.open(path, os.O_RDONLY)
    try:

        def read_into(offset: int, view: memoryview) -> None:
            while view.nbytes:
                n = os.preadv(fd, [view], offset)
                assert n > 0
                view, offset = view[n:], offset + n

        assert read_checksummed(read_into, 4, memoryview(out), pool).result() == crc
    finally:
        os.close(fd)
    np.testing.assert_array_equal(out, array)


def test_empty(pool: RecordingPool) -> None:
    calls: list[object] = []
    assert write_checksummed(calls.append, memoryview(b""), pool).result() == masked_crc32c(b"")
    assert read_checksummed(
        lambda o, v: calls.append(v), 0, memoryview(bytearray()), pool
    ).result() == (masked_crc32c(b""))
    assert calls == []
    assert pool.futures == []


@pytest.mark.parametrize("chunk", [0, -1])
def test_bad_chunk(pool: RecordingPool, chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        write_checksummed(lambda v: None, memoryview(b"x"), pool, chunk)
    with pytest.raises(ValueError, match="chunk"):
        read_checksummed(lambda o, v: None, 0, memoryview(bytearray(1)), pool, chunk)


@pytest.mark.parametrize("fail_at", [0, 3, 9])
def test_write_error_propagates_and_waits(pool: RecordingPool, fail_at: int) -> None:
    data = memoryview(bytes(1000))
    calls = 0

    def write(view: memoryview) -> None:
        nonlocal calls
        if calls == fail_at:
            raise OSError("disk full")
        calls += 1

    with pytest.raises(OSError, match="disk full"):
        write_checksummed(write, data, pool, 100)
    assert len(pool.futures) == fail_at + 1
    assert all(f.done() for f in pool.futures)  # nothing still reads `data`


@pytest.mark.parametrize("fail_at", [0, 3, 9])
def test_read_error_propagates_and_waits(pool: RecordingPool, fail_at: int) -> None:
    calls = 0

    def read_into(offset: int, view: memoryview) -> None:
        nonlocal calls
        if calls == fail_at:
            raise OSError("I/O error")
        calls += 1

    with pytest.raises(OSError, match="I/O error"):
        read_checksummed(read_into, 0, memoryview(bytearray(1000)), pool, 100)
    assert len(pool.futures) == fail_at
    assert all(f.done() for f in pool.futures)


@pytest.mark.parametrize("fail_at", [0, 4, 9])
def test_checksum_error_propagates(fail_at: int) -> None:
    pool = RecordingPool(fail_at=fail_at)
    try:
        with pytest.raises(RuntimeError, match=f"task {fail_at} failed"):
            write_checksummed(lambda v: None, memoryview(bytes(1000)), pool, 100).result()
        assert all(f.done() for f in pool.futures)
        pool.futures.clear()
        pool._fail_at = fail_at
        with pytest.raises(RuntimeError, match=f"task {fail_at} failed"):
            read_checksummed(lambda o, v: None, 0, memoryview(bytearray(1000)), pool, 100).result()
        assert all(f.done() for f in pool.futures)
    finally:
        pool.shutdown()


def test_write_error_wins_over_checksum_error() -> None:
    pool = RecordingPool(fail_at=2)

    def write(view: memoryview) -> None:
        if len(pool.futures) == 3:
            raise OSError("disk full")

    try:
        with pytest.raises(OSError, match="disk full"):
            write_checksummed(write, memoryview(bytes(1000)), pool, 100)
    finally:
        pool.shutdown()


def test_preallocate_keeps_size_and_contents(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_WRONLY)
    try:
        done = preallocate(fd, 3, 1 << 20)
        assert isinstance(done, bool)
        assert os.fstat(fd).st_size == 3
        assert preallocate(fd, 0, 0) is False
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc"


def test_preallocate_bad_fd_is_false() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    assert preallocate(fd, 0, 4096) is False


def test_last_checksum_may_run_on() -> None:
    """The caller goes on to the next tensor while the last chunk's checksum runs."""
    pool = RecordingPool(delay=0.5)
    try:
        data = b"x" * 250
        crc = write_checksummed(lambda v: None, memoryview(data), pool, 100)
        assert not crc.done()
        assert crc.result() == masked_crc32c(data)
        dest = bytearray(250)
        crc = read_checksummed(lambda o, v: None, 0, memoryview(dest), pool, 100)
        assert not crc.done()
        assert crc.result() == masked_crc32c(dest)
    finally:
        pool.shutdown()

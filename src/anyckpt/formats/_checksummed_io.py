"""Writing and reading a large buffer while a second thread checksums it, chunk by chunk.

The V2 format stores a masked CRC-32C of every tensor, so every byte is both moved (written
to / read from a file) and checksummed. Done as two passes over a whole large tensor, each
streams it from RAM and they share the memory bandwidth. Here the buffer is cut into chunks
that fit the caches: the calling thread moves chunk ``k`` while a pool thread checksums
chunk ``k`` (writes: both read the same bytes at the same time, so one of the two reads is
served by the cache) or chunk ``k - 1`` (reads: the bytes the last read has just put in
the cache). ``crc32c`` continues a CRC across chunks and releases the GIL, as do
``os.write`` and ``os.preadv``, so the two run on two cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Executor, Future

import crc32c as _crc32c

from ..codecs.crc import mask

#: Default chunk: a few MiB, small enough to stay in the shared L3 while both threads
#: touch it, large enough that the per-chunk hand-off (tens of µs) is a few percent.
CHUNK_BYTES = 4 << 20
#: How many chunks the checksums may trail the I/O before the I/O thread waits for them.
LAG_CHUNKS = 1


def _settle(future: Future[int] | None) -> None:
    """Wait for an in-flight checksum, ignoring its outcome (an error is already raised)."""
    if future is not None:
        with contextlib.suppress(BaseException):  # the caller's exception is the one raised
            future.result()


def _crc(piece: memoryview, before: Future[int] | None, last: bool) -> int:
    """CRC-32C of ``piece`` continuing ``before``'s (0: the first chunk); masked if ``last``."""
    crc = int(_crc32c.crc32c(piece, 0 if before is None else before.result()))
    return mask(crc) if last else crc


def _chunks(view: memoryview, chunk: int) -> list[memoryview]:
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, not {chunk}")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return [view[start : start + chunk] for start in range(0, view.nbytes, chunk)]


def _empty_crc() -> Future[int]:
    done: Future[int] = Future()
    done.set_result(mask(0))
    return done


def write_checksummed(
    write: Callable[[memoryview], object],
    data: memoryview,
    pool: Executor,
    chunk: int = CHUNK_BYTES,
    lag: int = LAG_CHUNKS,
) -> Future[int]:
    """Write ``data`` with ``write`` (all of each chunk it is given) while ``pool`` computes
    its CRC-32C; return a future of the masked CRC
    (:func:`anyckpt.codecs.crc.masked_crc32c` of ``data``).

    The pool checksums each chunk while it is written here; this thread waits before a
    chunk only if the checksums trail by more than ``lag`` chunks. The last chunk's may
    still run on return (so the next tensor's writes need not wait for it): ``data`` must
    stay unchanged until the future is done. On an error, no checksum is left running."""
    pieces = _chunks(data, chunk)
    futures: list[Future[int]] = []
    crc: Future[int] | None = None
    try:
        for k, piece in enumerate(pieces):
            if k > lag:
                futures[k - lag - 1].result()
            # Chained: each task waits only for the one before it (on a one-thread pool it
            # ran first), so when a chunk's checksum is done, so are all before it.
            crc = pool.submit(_crc, piece, crc, k == len(pieces) - 1)
            futures.append(crc)
            write(piece)
    except BaseException:
        _settle(crc)
        raise
    return crc if crc is not None else _empty_crc()


def read_checksummed(
    read_into: Callable[[int, memoryview], object],
    offset: int,
    dest: memoryview,
    pool: Executor,
    chunk: int = CHUNK_BYTES,
    lag: int = LAG_CHUNKS,
) -> Future[int]:
    """Fill ``dest`` from the file bytes at ``offset`` with ``read_into(offset, view)`` (which
    fills all of ``view``), chunk by chunk, while ``pool`` checksums each chunk read; return
    a future of the masked CRC-32C of what was read.

    The pool checksums a chunk, still in the cache, while the next is read here; this
    thread waits before a read only if the checksums trail that by more than ``lag``
    chunks. The last chunk's may still run on return (so the next tensor's reads need not
    wait for it): ``dest`` must stay unchanged until the future is done. On an error, no
    checksum is left running."""
    pieces = _chunks(dest, chunk)
    futures: list[Future[int]] = []
    crc: Future[int] | None = None
    try:
        for k, piece in enumerate(pieces):
            if k > lag + 1:
                futures[k - lag - 2].result()  # chunk k - 1's may still run: it was just read
            read_into(offset + k * chunk, piece)
            crc = pool.submit(_crc, piece, crc, k == len(pieces) - 1)
            futures.append(crc)
    except BaseException:
        _settle(crc)
        raise
    return crc if crc is not None else _empty_crc()

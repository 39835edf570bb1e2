"""Writing one V2 data file: tensors in key order, unpadded, each with its masked CRC-32C."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..codecs.bundle import (
    BundleEntry,
    encode_string_tensor,
)
from ..codecs.crc import masked_crc32c
from ..codecs.dtypes import (
    DT_STRING,
    enum_from_dtype,
    to_little_endian,
)
from ..storage import Storage
from ._arrays import _byte_view, _is_le_contiguous
from .v2_layout import GATHER_BELOW, GATHER_BYTES, PARALLEL_BYTES


def _write_shard(
    storage: Storage,
    path: str,
    items: Sequence[tuple[bytes, np.ndarray]],
    durable: bool,
    shard_id: int,
    check_cancelled: Callable[[], None],
) -> dict[bytes, BundleEntry]:
    """Write one data file; return the index entries of its tensors (runs in a worker thread).

    Small tensors are gathered into one ``writev`` per IOV_MAX of them (where the storage
    offers ``write_many``); the checksums of large ones are computed by a helper thread that
    runs ahead of the writes. Bytes and checksums are the same as writing one by one."""
    entries: dict[bytes, BundleEntry] = {}
    writer = storage.open_writer(path, durable=durable)
    write_many = getattr(writer, "write_many", None)
    helper: ThreadPoolExecutor | None = None
    try:
        big: list[memoryview] = []  # views of the large tensors, checksummed by the helper
        slot: list[int] = []  # each item's place in `big`, or -1
        for _, array in items:
            if (
                array.nbytes >= PARALLEL_BYTES
                and array.dtype != object
                and _is_le_contiguous(array)
            ):
                slot.append(len(big))
                big.append(_byte_view(array))
            else:
                slot.append(-1)
        big_crcs: Future[list[int]] | None = None
        if big:
            helper = ThreadPoolExecutor(1, thread_name_prefix="anyckpt-crc")
            big_crcs = helper.submit(lambda: [masked_crc32c(view) for view in big])
        pending: list[memoryview] = []
        pending_bytes = 0
        located: list[tuple[bytes, int, tuple[int, ...], int, int, int]] = []
        offset = 0
        for (key, array), place in zip(items, slot, strict=True):
            dtype = enum_from_dtype(array.dtype)
            if dtype == DT_STRING:
                data, crc = encode_string_tensor(array.reshape(-1).tolist())
                view = memoryview(data)
            elif place >= 0:
                view, crc = big[place], -1 - place  # the helper's checksum, filled in below
            else:
                view = _byte_view(to_little_endian(array))
                crc = masked_crc32c(view)
            size = view.nbytes
            if write_many is not None and size < GATHER_BELOW:
                pending.append(view)
                pending_bytes += size
                if len(pending) >= 1024 or pending_bytes >= GATHER_BYTES:
                    check_cancelled()
                    write_many(pending)
                    pending, pending_bytes = [], 0
            else:
                if pending:
                    write_many(pending)  # type: ignore[misc]
                    pending, pending_bytes = [], 0
                check_cancelled()
                writer.write(view)
            located.append((key, dtype, array.shape, offset, size, crc))
            offset += size
        if pending:
            check_cancelled()
            write_many(pending)  # type: ignore[misc]
        crcs = big_crcs.result() if big_crcs is not None else []
        for key, dtype, shape, at, size, crc in located:
            if crc < 0:
                crc = crcs[-1 - crc]
            entries[key] = BundleEntry(dtype, tuple(shape), shard_id, at, size, crc)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if helper is not None:
            helper.shutdown(wait=True, cancel_futures=True)
    return entries

"""The copy an async save makes of the tensors before ``save()`` returns."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from operator import attrgetter

import anyio
import anyio.abc
import anyio.to_thread
import numpy as np

from .._concurrency import run_concurrently
from ..codecs.dtypes import NUMERIC_DTYPES

#: Arrays smaller than this are copied on the calling thread: for them a copy is mostly
#: Python overhead, which threads (sharing the GIL) would only add to.
THREADED_COPY_BYTES = 1 << 20

_NDARRAY = frozenset({np.ndarray})
_dtype_of = attrgetter("dtype")
_shape_of = attrgetter("shape")


async def capture(tensors: Mapping[str, np.ndarray], *, threads: int = 2) -> dict[str, np.ndarray]:
    """Copy every array once (C order), so the caller may mutate its arrays as soon as this
    returns. Large arrays are spread over worker threads (NumPy copies release the GIL); small
    ones, and object arrays (bytes are immutable: a shallow copy is a full capture), are
    copied here in one loop, or all at once if they share a dtype and shape."""
    block = _capture_block(tensors)
    if block is not None:
        return block
    out: dict[str, np.ndarray] = {}
    big: list[tuple[str, np.ndarray]] = []
    for key, value in tensors.items():
        if value.nbytes >= THREADED_COPY_BYTES and value.dtype != object:
            big.append((key, value))
        else:
            out[key] = value.copy()  # C order; keeps subclasses (anyckpt.Partitioned)
    if not big:
        return out  # in the caller's order already
    big.sort(key=lambda kv: -kv[1].nbytes)
    lanes: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(max(1, threads))]
    loads = [0] * len(lanes)
    for kv in big:  # greedy balance by bytes
        i = loads.index(min(loads))
        lanes[i].append(kv)
        loads[i] += kv[1].nbytes

    def copy_lane(lane: list[tuple[str, np.ndarray]]) -> None:
        for key, value in lane:
            out[key] = value.copy()

    if len(big) == 1:
        copy_lane(big)
    else:
        await run_concurrently(
            partial(anyio.to_thread.run_sync, copy_lane, lane) for lane in lanes if lane
        )
    return {key: out[key] for key in tensors}


def _capture_block(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Many small arrays of one numeric dtype and one shape (the layers of a deep model),
    copied all at once: their bytes joined into one fresh buffer, whose rows are handed out as
    the copies. C-level passes instead of a Python call per array. None if ``tensors`` is not
    such a state (checked in bulk)."""
    values = list(tensors.values())
    if len(values) < 2:
        return None
    first = values[0]
    dtype, shape = first.dtype, first.shape
    if (
        type(first) is not np.ndarray
        or not shape
        or first.nbytes >= THREADED_COPY_BYTES
        or dtype not in NUMERIC_DTYPES  # never object arrays: join would take their pointers
        or any(v.shape != shape or v.dtype != dtype for v in values[1:8])  # fails fast
        or set(map(type, values)) != _NDARRAY
        or set(map(_dtype_of, values)) != {dtype}
        or set(map(_shape_of, values)) != {shape}
    ):
        return None
    try:
        # The copy: one malloc'd buffer (not np.empty, whose huge pages can stall the caller
        # in the kernel's compaction). Refuses arrays that are not C-contiguous.
        data = bytearray().join(values)  # type: ignore[arg-type]
    except TypeError:
        return None
    rows = np.frombuffer(data, dtype=dtype).reshape(len(values), *shape)
    return dict(zip(tensors, rows, strict=True))

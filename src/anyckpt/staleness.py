"""The stale-snapshot guard: did the caller change arrays it saved with ``copy=False``?

``save(state, copy=False)`` writes the caller's own arrays, trusting it not to change them
until the save is committed. When a training loop breaks that promise (an optimizer step while
the write is still going), the checkpoint holds a mix of two steps, or the next step's values
under this step's number — a bug DCP and NeMo users have filed as "successive checkpoints
bit-identical". The manager records a digest of every array when it takes them, checks it
again once the checkpoint is written and before it commits, and fails the save with
:class:`StaleSnapshotError` (naming the first changed tensor) if they differ; nothing is
committed then.

Two digests (``CheckpointManager(stale_check=...)``):

- ``"sample"`` (the default): CRC-32C of up to 64 evenly spaced runs of 64 bytes of each array
  (the whole array when it is at most 4 KiB). Constant cost per array, whatever its size;
  catches what an optimizer step does (every element changes), not a change confined to bytes
  it does not sample (one row of an embedding).
- ``"full"``: CRC-32C of every byte (hardware CRC, in a worker thread): catches any change,
  for the price of reading the state twice more.

``None`` turns the guard off. Measured costs are in docs/manager.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import crc32c as _crc32c_module
import numpy as np

from .codecs.crc import crc32c
from .errors import CheckpointError

__all__ = ["StaleCheck", "StaleSnapshotError", "changed_tensor", "digest"]

#: The C function itself (no wrapper per call: the digest of 10,000 small tensors).
_crc32c = _crc32c_module.crc32c

StaleCheck = Literal["sample", "full"]

#: Sampled runs per array, and their length in bytes.
SAMPLES = 64
RUN = 64


class StaleSnapshotError(CheckpointError):
    """A tensor saved with ``copy=False`` changed before its save was committed."""


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 view (a copy only if it is not contiguous)."""
    contiguous = np.ascontiguousarray(array)
    return contiguous.reshape(-1).view(np.uint8)


def _object_digest(array: np.ndarray) -> int:
    crc = 0
    for item in array.reshape(-1).tolist():
        data = item if isinstance(item, bytes) else repr(item).encode()
        crc = crc32c(len(data).to_bytes(8, "little"), crc)
        crc = crc32c(data, crc)
    return crc


def _array_digest(array: np.ndarray, mode: StaleCheck) -> int:
    if array.dtype == object:
        return _object_digest(array)
    if mode == "full" or array.nbytes <= SAMPLES * RUN:
        return crc32c(_bytes_of(array).data)
    if not array.flags.c_contiguous and not array.flags.f_contiguous:
        # Sample elements (no copy of the whole array): evenly spaced flat positions.
        positions = np.linspace(0, array.size - 1, SAMPLES * 8).astype(np.intp)
        return crc32c(np.ascontiguousarray(array.reshape(-1)[positions]).data)
    data = array.reshape(-1, order="A").view(np.uint8)
    starts = np.linspace(0, data.size - RUN, SAMPLES).astype(np.intp)
    runs = data[starts[:, None] + np.arange(RUN)]
    return crc32c(np.ascontiguousarray(runs).data)


def digest(tensors: Mapping[str, np.ndarray], mode: StaleCheck) -> dict[str, int]:
    """The digest of each array (``mode`` as in the module's doc)."""
    if mode not in ("sample", "full"):
        raise ValueError(f"stale_check must be 'sample', 'full' or None, got {mode!r}")
    whole = SAMPLES * RUN if mode == "sample" else None
    out: dict[str, int] = {}
    for key, value in tensors.items():
        # The common case first, with the least Python: a C-contiguous numeric array digested
        # whole (a model of 10,000 small tensors: ~0.3 µs each).
        if (whole is None or value.nbytes <= whole) and not value.dtype.hasobject:
            try:
                out[key] = _crc32c(value)  # type: ignore[arg-type]  # ndarray: a buffer
                continue
            except (ValueError, BufferError, TypeError):
                pass  # not C-contiguous
        out[key] = _array_digest(value, mode)
    return out


def changed_tensor(
    tensors: Mapping[str, np.ndarray], recorded: Mapping[str, int], mode: StaleCheck
) -> str | None:
    """The first tensor whose digest differs from ``recorded`` (None if none does)."""
    now = digest(tensors, mode)
    for key in tensors:
        if now[key] != recorded.get(key):
            return key
    return None


def stale_error(name: str, step: int, prefix: str) -> StaleSnapshotError:
    return StaleSnapshotError(
        f"tensor {name!r} changed while the save of step {step} ({prefix}) was being written: "
        "save(copy=False) needs the arrays unchanged until the save is committed (await it, "
        "or save with copy=True); nothing was committed"
    )

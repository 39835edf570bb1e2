"""Partitioned tensors: one value saved as several slices, as TensorFlow's partitioned variables.

A :class:`Partitioned` is an ordinary NumPy array (the full value) that also says how it is split.
Formats that know partitions (V1, V2) store one slice per partition plus the full name; any other
format just sees the full array. Reading gives back the assembled array, with the stored slices
listed in :attr:`anyckpt.TensorSpec.partitions`.

    w = anyckpt.Partitioned((6, 2), [([(0, 2), (0, 2)], top), ([(2, 4), (0, 2)], rest)])
    w = anyckpt.Partitioned.split(full, 3, axis=0)   # tf.compat.v1.fixed_size_partitioner
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .to_numpy import to_numpy

Extent = tuple[int, int]  # (start, length), both explicit
Extents = tuple[Extent, ...]
ExtentLike = tuple[int, int] | slice


def _extents(spec: Sequence[ExtentLike], shape: tuple[int, ...]) -> Extents:
    if len(spec) != len(shape):
        raise ValueError(f"partition {list(spec)} has rank {len(spec)}, the tensor {len(shape)}")
    out: list[Extent] = []
    for item, dim in zip(spec, shape, strict=True):
        if isinstance(item, slice):
            start, stop, step = item.indices(dim)
            if step != 1:
                raise ValueError("partition slices must have step 1")
            extent = (start, max(stop - start, 0))
        else:
            start, length = item
            extent = (int(start), int(length))
        if extent[0] < 0 or extent[1] < 1 or extent[0] + extent[1] > dim:
            raise ValueError(f"partition extent {extent} does not fit a dimension of {dim}")
        out.append(extent)
    return tuple(out)


def check_tiling(shape: tuple[int, ...], partitions: Sequence[Extents]) -> None:
    """Raise ValueError unless ``partitions`` cover ``shape`` exactly, without overlap."""
    if not shape:
        raise ValueError("a scalar cannot be partitioned")
    if not partitions:
        raise ValueError("a partitioned tensor needs at least one partition")
    if _tiles_fast(shape, partitions):
        return
    volume = 0
    for part in partitions:
        if len(part) != len(shape):
            raise ValueError(f"partition {part} does not have rank {len(shape)}")
        for (start, length), dim in zip(part, shape, strict=True):
            if start < 0 or length < 1 or start + length > dim:
                raise ValueError(f"partition {part} lies outside the shape {shape}")
        volume += math.prod(length for _, length in part)
    overlap = _first_overlap(shape, partitions)
    if overlap is not None:
        raise ValueError(f"partitions {overlap[0]} and {overlap[1]} overlap")
    if volume != math.prod(shape):
        raise ValueError(f"the partitions do not cover the shape {shape}")


def _tiles_fast(shape: tuple[int, ...], partitions: Sequence[Extents]) -> bool:
    """True if ``partitions`` are many pieces of ``shape``'s rank that lie inside it, split
    along at most one axis without overlap, and cover it: the common case (thousands of row
    pieces from a save over as many ranks), checked with NumPy in one pass. False means "not
    shown here": the exact checks then run (and name the offending piece)."""
    if len(partitions) < 64 or any(len(part) != len(shape) for part in partitions):
        return False
    try:
        extents = np.asarray(partitions, dtype=np.int64)  # (P, rank, 2): start, length
    except (OverflowError, TypeError, ValueError):
        return False
    if extents.shape != (len(partitions), len(shape), 2):
        return False
    starts, lengths = extents[:, :, 0], extents[:, :, 1]
    try:
        dims = np.asarray(shape, dtype=np.int64)
    except OverflowError:
        return False
    if (starts < 0).any() or (lengths < 1).any() or (starts > dims - lengths).any():
        return False
    volume = int(np.prod(lengths.astype(object), axis=1).sum())  # exact, no overflow
    if volume != math.prod(shape):
        return False
    return _first_overlap(shape, partitions, extents) is None


def _first_overlap(
    shape: tuple[int, ...], partitions: Sequence[Extents], extents: np.ndarray | None = None
) -> tuple[Extents, Extents] | None:
    """Two partitions (in the given order) that share an element, or None.

    Pieces split along one axis (TensorFlow's partitioners, FSDP rows, tensor-parallel
    columns) are checked by sorting their starts: O(P log P), as a save over thousands of
    ranks needs. Others fall back to comparing each pair."""
    if len(partitions) < 2:
        return None
    if extents is None:
        extents = np.asarray(partitions, dtype=np.int64)  # (P, rank, 2): start, length
    starts, lengths = extents[:, :, 0], extents[:, :, 1]
    same = (extents == extents[0]).all(axis=(0, 2))  # per axis: every piece alike
    varying = [axis for axis in range(len(shape)) if not same[axis]]
    if len(varying) <= 1:
        axis = varying[0] if varying else 0
        order = np.argsort(starts[:, axis], kind="stable")
        ends = starts[order, axis] + lengths[order, axis]
        clash = np.flatnonzero(starts[order[1:], axis] < ends[:-1])
        if not len(clash):
            return None
        i, j = sorted((int(order[clash[0]]), int(order[clash[0] + 1])))
        return partitions[i], partitions[j]
    for i, part in enumerate(partitions):
        for other in partitions[:i]:
            if all(
                max(a, c) < min(a + b, c + d) for (a, b), (c, d) in zip(part, other, strict=True)
            ):
                return other, part
    return None


class Partitioned(np.ndarray[Any, np.dtype[Any]]):
    """The full value of a partitioned tensor, plus its ``partitions`` (explicit extents).

    Build it from pieces, ``Partitioned(shape, [(extents, array), ...])`` where ``extents`` is
    one ``(start, length)`` or ``slice`` per dimension; from a full array with
    :meth:`from_full`; or evenly with :meth:`split`. Slicing or reshaping gives a plain array.
    """

    partitions: tuple[Extents, ...]

    def __new__(
        cls,
        shape: Sequence[int],
        parts: Iterable[tuple[Sequence[ExtentLike], Any]],
    ) -> Partitioned:
        full_shape = tuple(int(d) for d in shape)
        pieces = [(_extents(spec, full_shape), to_numpy(array)) for spec, array in parts]
        if not pieces:
            raise ValueError("a partitioned tensor needs at least one partition")
        dtypes = {array.dtype for _, array in pieces}
        if len(dtypes) != 1:
            raise ValueError(f"the partitions have different dtypes: {sorted(map(str, dtypes))}")
        full = np.empty(full_shape, dtype=pieces[0][1].dtype)
        for extents, array in pieces:
            if array.shape != tuple(length for _, length in extents):
                raise ValueError(f"partition {extents} holds an array of shape {array.shape}")
            full[tuple(slice(s, s + n) for s, n in extents)] = array
        return cls.from_full(full, [extents for extents, _ in pieces])

    @classmethod
    def from_full(cls, array: Any, partitions: Iterable[Sequence[ExtentLike]]) -> Partitioned:
        """View ``array`` (no copy) as split into ``partitions``."""
        base = np.asarray(array)
        parts = sorted(_extents(spec, base.shape) for spec in partitions)
        check_tiling(base.shape, parts)
        obj = base.view(cls)
        obj.partitions = tuple(parts)
        return obj

    @classmethod
    def split(cls, array: Any, num: int, axis: int = 0) -> Partitioned:
        """Split along ``axis`` into ``num`` pieces, the first ones one longer when it does not
        divide (``tf.compat.v1.fixed_size_partitioner``)."""
        base = np.asarray(array)
        if not base.ndim:
            raise ValueError("a scalar cannot be partitioned")
        axis = axis % base.ndim
        dim = base.shape[axis]
        num = min(num, dim)
        if num < 1:
            raise ValueError("need at least one partition of a non-empty axis")
        sizes = [dim // num + (1 if i < dim % num else 0) for i in range(num)]
        parts = []
        start = 0
        for size in sizes:
            parts.append([(start, size) if i == axis else (0, d) for i, d in enumerate(base.shape)])
            start += size
        return cls.from_full(base, parts)

    def __array_finalize__(self, obj: Any) -> None:
        same = obj is not None and getattr(obj, "shape", None) == self.shape
        self.partitions = getattr(obj, "partitions", ()) if same else ()

    def pieces(self) -> list[tuple[Extents, np.ndarray]]:
        """(extents, plain array view) of each partition, in ``partitions`` order."""
        base = self.view(np.ndarray)
        return [(e, base[tuple(slice(s, s + n) for s, n in e)]) for e in self.partitions]

    def __reduce__(self) -> Any:
        return (Partitioned.from_full, (self.view(np.ndarray).copy(), self.partitions))


def partitions_of(array: np.ndarray) -> tuple[Extents, ...]:
    """The partitions of ``array`` if it is a valid :class:`Partitioned`, else ``()``."""
    parts: tuple[Extents, ...] = getattr(array, "partitions", ())
    if parts:
        check_tiling(array.shape, parts)
    return parts

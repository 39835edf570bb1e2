"""``Sharded``: one rank's piece of a tensor that is split over ranks (FSDP, ZeRO, tensor
parallelism), and :func:`even_slice`, the even split most sharding schemes use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from ..tensors import as_tensor


class Sharded:
    """This rank's piece of a tensor of ``global_shape``, placed at ``offsets``.

    Save it under the tensor's name from every rank that holds a piece; the pieces of all
    ranks must tile the global shape exactly (pieces held by several ranks, with the same
    offsets and shape, are replicas: written once). The checkpoint stores the tensor as
    TensorFlow stores a partitioned variable (one entry per piece), so it reads back whole, or
    any part of it, on any number of ranks. A piece with no elements is allowed (a rank that
    got nothing of an uneven split) and stores nothing.
    """

    __slots__ = ("global_shape", "local", "offsets")

    def __init__(self, local: Any, global_shape: Sequence[int], offsets: Sequence[int]) -> None:
        array = as_tensor(local)
        shape = tuple(int(d) for d in global_shape)
        starts = tuple(int(o) for o in offsets)
        if not shape:
            raise ValueError("a scalar cannot be sharded")
        if len(starts) != len(shape) or array.ndim != len(shape):
            raise ValueError(
                f"global shape {shape}, offsets {starts} and local shape {array.shape} "
                "must have the same rank"
            )
        for start, length, dim in zip(starts, array.shape, shape, strict=True):
            if start < 0 or start + length > dim:
                raise ValueError(
                    f"a piece of shape {array.shape} at {starts} does not fit in {shape}"
                )
        self.local = array
        self.global_shape = shape
        self.offsets = starts

    @classmethod
    def split(cls, full: Any, rank: int, world_size: int, axis: int = 0) -> Sharded:
        """Rank ``rank``'s piece of ``full`` split evenly along ``axis`` (see :func:`even_slice`),
        as a view: for tests and examples, where every rank has the full value."""
        base = np.asarray(full)
        if not base.ndim:
            raise ValueError("a scalar cannot be sharded")
        axis %= base.ndim
        rows = even_slice(base.shape[axis], rank, world_size)
        index = tuple(rows if i == axis else slice(None) for i in range(base.ndim))
        offsets = [rows.start if i == axis else 0 for i in range(base.ndim)]
        return cls(base[index], base.shape, offsets)

    @property
    def extents(self) -> tuple[tuple[int, int], ...]:
        """(start, length) per dimension."""
        return tuple(zip(self.offsets, self.local.shape, strict=True))

    @property
    def dtype(self) -> np.dtype:
        return self.local.dtype

    @property
    def size(self) -> int:
        return math.prod(self.local.shape)

    def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "a Sharded piece is saved by a CheckpointManager with a coordinator "
            "(anyckpt.distributed), not as an ordinary array"
        )

    def __repr__(self) -> str:
        return (
            f"Sharded(local shape {self.local.shape}, dtype {self.local.dtype}, "
            f"global shape {self.global_shape}, offsets {self.offsets})"
        )


def even_slice(length: int, rank: int, world_size: int) -> slice:
    """The part of ``range(length)`` rank ``rank`` of ``world_size`` holds when it is split
    into ``world_size`` consecutive parts, the first ones one longer when it does not divide
    (TensorFlow's ``fixed_size_partitioner``; ``numpy.array_split``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if length < 0:
        raise ValueError("length must be >= 0")
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))

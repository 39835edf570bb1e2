"""Sharded saves: which tensors go into which shard file (pure planning, no I/O).

TensorFlow's Saver with ``sharded=True`` groups variables by device, sorts the device names and
writes one shard per device, concurrently. The built-in formats take the same decision through
``write(..., options=...)``:

* ``devices``: a mapping ``{name: device}`` or a callable ``name -> device``. Tensors are grouped
  by device (a missing or ``None`` device is ``""``), groups ordered by device name, one or more
  shards per group.
* ``max_shard_bytes``: split each group, in key order, so that no shard holds more than this
  many bytes (a tensor bigger than that gets a shard of its own). Several files are written
  concurrently, which is what makes large saves fast on object stores.
* ``num_shards``: balance all tensors over this many shards by size (largest first, each to the
  least-filled shard). Not combined with ``devices``.
* ``shard_of``: a callable ``name -> shard number`` (0..n-1), for full control.

A partitioned tensor (:class:`anyckpt.Partitioned`) is placed as a whole, by its full name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidOptionError
from .base import FormatOption

DeviceSpec = Mapping[str, str] | Callable[[str], str | None]

#: The option names the planner understands.
SHARD_OPTIONS = frozenset({"devices", "max_shard_bytes", "num_shards", "shard_of"})

#: The options of the built-in formats (V1, V2): the planner's, with their types.
SHARD_FORMAT_OPTIONS: Mapping[str, FormatOption] = {
    "devices": FormatOption((Mapping, Callable), "tensor name -> device; one shard per device"),
    "max_shard_bytes": FormatOption((int,), "split so that no shard holds more bytes"),
    "num_shards": FormatOption((int,), "balance the tensors over this many shards"),
    "shard_of": FormatOption((Callable,), "tensor name -> shard number"),
}


@dataclass(frozen=True)
class ShardOptions:
    """Validated sharding options (all None: one unsharded file)."""

    devices: DeviceSpec | None = None
    max_shard_bytes: int | None = None
    num_shards: int | None = None
    shard_of: Callable[[str], int] | None = None

    @property
    def sharded(self) -> bool:
        """Whether any sharding was asked for (V1 then names files ``-SSSSS-of-NNNNN``)."""
        return any(
            x is not None
            for x in (self.devices, self.max_shard_bytes, self.num_shards, self.shard_of)
        )

    @property
    def needs_sizes(self) -> bool:
        return self.max_shard_bytes is not None or self.num_shards is not None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ShardOptions:
        options = options or {}
        devices = options.get("devices")
        max_bytes = options.get("max_shard_bytes")
        num = options.get("num_shards")
        shard_of = options.get("shard_of")
        if devices is not None and not (isinstance(devices, Mapping) or callable(devices)):
            raise InvalidOptionError("devices must be a mapping {name: device} or a callable")
        if shard_of is not None and not callable(shard_of):
            raise InvalidOptionError("shard_of must be a callable name -> shard number")
        for label, value in (("max_shard_bytes", max_bytes), ("num_shards", num)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
            ):
                raise InvalidOptionError(f"{label} must be a positive integer, not {value!r}")
        if shard_of is not None and (devices, max_bytes, num) != (None, None, None):
            raise InvalidOptionError("shard_of cannot be combined with other sharding options")
        if num is not None and devices is not None:
            raise InvalidOptionError("num_shards cannot be combined with devices")
        return cls(
            devices,
            None if max_bytes is None else int(max_bytes),
            None if num is None else int(num),
            shard_of,
        )


def tensor_nbytes(array: np.ndarray) -> int:
    """Approximate stored size: the data bytes (strings: their lengths plus a byte each)."""
    if array.dtype == object:
        return int(sum(len(s) + 1 for s in array.reshape(-1).tolist()))
    return int(array.nbytes)


def _device(devices: DeviceSpec, key: str) -> str:
    device = devices.get(key) if isinstance(devices, Mapping) else devices(key)
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device of {key!r} must be a str, not {type(device).__name__}")
    return device or ""


def plan_shards(sizes: Sequence[tuple[str, int]], options: ShardOptions) -> list[list[str]]:
    """Split ``(key, nbytes)`` pairs (in key order) into shards; each shard keeps key order.

    Without sharding options there is one shard. With ``shard_of``, shard numbers in between
    that receive nothing stay as empty shards; the other options never make an empty shard
    (except one for an empty checkpoint).
    """
    order = {key: i for i, (key, _) in enumerate(sizes)}
    if options.shard_of is not None:
        by_number: dict[int, list[str]] = defaultdict(list)
        for key, _ in sizes:
            number = options.shard_of(key)
            if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
                raise TypeError(f"shard_of({key!r}) returned {number!r}, not an int")
            if number < 0:
                raise ValueError(f"shard numbers must be 0..n-1, got {number} for {key!r}")
            by_number[int(number)].append(key)
        count = max(by_number, default=0) + 1
        return [by_number.get(i, []) for i in range(count)]

    groups: list[list[tuple[str, int]]]
    if options.devices is not None:
        by_device: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key, size in sizes:
            by_device[_device(options.devices, key)].append((key, size))
        groups = [by_device[d] for d in sorted(by_device)]
    else:
        groups = [list(sizes)]

    if options.num_shards is not None:
        groups = _balance(groups[0], options.num_shards, order)  # no devices: one group
    if options.max_shard_bytes is not None:
        groups = [part for group in groups for part in _by_size(group, options.max_shard_bytes)]
    shards = [[key for key, _ in group] for group in groups if group]
    return shards or [[]]


def _by_size(group: list[tuple[str, int]], limit: int) -> list[list[tuple[str, int]]]:
    out: list[list[tuple[str, int]]] = []
    total = 0
    for key, size in group:
        if not out or (total + size > limit and total > 0):
            out.append([])
            total = 0
        out[-1].append((key, size))
        total += size
    return out


def _balance(
    group: list[tuple[str, int]], count: int, order: Mapping[str, int]
) -> list[list[tuple[str, int]]]:
    count = max(1, min(count, len(group)))
    bins: list[list[tuple[str, int]]] = [[] for _ in range(count)]
    loads = [0] * count
    for key, size in sorted(group, key=lambda kv: (-kv[1], order[kv[0]])):
        i = min(range(count), key=lambda j: (loads[j], len(bins[j])))  # no bin left empty
        bins[i].append((key, size))
        loads[i] += size
    return [sorted(b, key=lambda kv: order[kv[0]]) for b in bins]

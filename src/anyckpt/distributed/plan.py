"""Who writes what in a multi-process save (pure: no I/O, no communication).

Every rank sends the primary (rank 0) its manifest (the names, dtypes, shapes and pieces it
holds, never the bytes); the primary computes the plan from all of them and sends each rank
only its own share of it (:class:`Assignment`), so what a save moves between processes grows
with the world size times the tensors, not with its square:

* a tensor (or piece of a sharded tensor) held by several ranks is a replica and is written
  by one of them: those held by one rank are assigned first, then replicas from the largest
  down, each to the holder with the fewest bytes so far (ties: the lowest rank), as
  ``torch.distributed.checkpoint`` deduplicates;
* each rank's share is cut into data files by the sharding options (one file by default,
  ``num_shards`` per rank, or ``max_shard_bytes``); the files are numbered rank by rank, so
  every rank knows the names of its files (``PREFIX.data-SSSSS-of-NNNNN``) before writing;
* the pieces of a sharded tensor must tile it exactly; they are stored as TensorFlow stores a
  partitioned variable: a full-name entry listing the slices, plus one entry per slice.

Inconsistent manifests (a name with two dtypes or shapes, pieces that overlap or leave gaps)
raise :class:`PlanError`, on every rank alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from operator import itemgetter
from typing import Any, NoReturn

from .._concurrency import cyclic_gc_paused
from ..codecs.bundle import BundleEntry
from ..codecs.ordered_code import encode_tensor_name_slice
from ..errors import CheckpointError
from ..formats.sharded import ShardOptions, plan_shards
from ..partitioned import check_tiling
from ..tensors import key_from_bytes

Extents = tuple[tuple[int, int], ...]


class PlanError(CheckpointError):
    """The ranks' states do not fit together into one checkpoint."""


@dataclass(frozen=True, order=True)
class Item:
    """One thing a rank holds: a whole tensor (``extents`` None) or a piece of one."""

    key: bytes  # the tensor's stored name
    extents: Extents | None
    dtype: int  # TensorFlow DataType enum
    shape: tuple[int, ...]  # the whole tensor's shape
    nbytes: int

    @property
    def unit(self) -> tuple[bytes, Extents | None]:
        return (self.key, self.extents)

    @property
    def data_key(self) -> bytes:
        """The key of its index entry (and its order in a data file)."""
        if self.extents is None:
            return self.key
        return encode_tensor_name_slice(self.key, self.extents)


@dataclass(frozen=True)
class Manifest:
    """What one rank brings to a save. ``error`` is set when the rank failed before writing
    (its state could not be prepared): then nobody writes anything."""

    name: str
    items: tuple[Item, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    num_shards: int
    #: Per rank: the items of each of its data files, in data-key order.
    shards: tuple[tuple[tuple[Item, ...], ...], ...]
    #: Per rank: the number of its first data file.
    first_shard: tuple[int, ...]
    #: Full-name entries of sliced tensors (no data), by stored name.
    holders: Mapping[bytes, BundleEntry] = field(default_factory=dict)

    def files_of(self, rank: int) -> list[tuple[int, tuple[Item, ...]]]:
        """(shard number, items) of the data files ``rank`` writes."""
        first = self.first_shard[rank]
        return [(first + i, items) for i, items in enumerate(self.shards[rank])]

    def data_keys(self) -> set[bytes]:
        return {item.data_key for per_rank in self.shards for f in per_rank for item in f}


#: The sharding options that make sense per rank.
RANK_SHARD_OPTIONS = frozenset({"num_shards", "max_shard_bytes"})


def shard_options(options: Mapping[str, Any] | None) -> ShardOptions:
    """Validated per-rank sharding options (``num_shards``, ``max_shard_bytes``)."""
    options = dict(options or {})
    unknown = {k for k in options if options[k] is not None} - RANK_SHARD_OPTIONS
    if unknown:
        raise ValueError(
            f"a distributed save shards each rank's share by num_shards or max_shard_bytes; "
            f"{', '.join(sorted(unknown))} is not supported"
        )
    opts = ShardOptions.from_options(options)
    if opts.num_shards is not None and opts.max_shard_bytes is not None:
        raise ValueError("num_shards and max_shard_bytes cannot be combined")
    return opts


def make_plan(manifests: Sequence[Manifest], options: ShardOptions | None = None) -> Plan:
    """The plan every rank computes from every rank's manifest (index = rank)."""
    with cyclic_gc_paused():  # millions of tuples, no cycles
        return _make_plan(manifests, options)


def _make_plan(manifests: Sequence[Manifest], options: ShardOptions | None) -> Plan:
    options = options or ShardOptions()
    world = len(manifests)
    if world < 1:
        raise ValueError("no manifests")
    # Every item by tensor name (a bytes key hashes once), then each tensor's units (pieces),
    # each with the ranks that hold it: a tuple of extents would be hashed at every lookup.
    by_key: dict[bytes, list[tuple[int, Item]]] = {}
    for rank, manifest in enumerate(manifests):
        for item in manifest.items:
            held = by_key.get(item.key)
            if held is None:
                by_key[item.key] = [(rank, item)]
            else:
                held.append((rank, item))
    # (the first holder's item, the holding ranks in order), per unit
    units: list[tuple[Item, list[int]]] = []
    holders: dict[bytes, BundleEntry] = {}
    for key, held in by_key.items():
        first_rank, first = held[0]
        for rank, item in held:
            if item.dtype != first.dtype or item.shape != first.shape:
                _mismatch(item, first, rank, first_rank)
            if (item.extents is None) != (first.extents is None):
                raise PlanError(
                    f"tensor {key_from_bytes(key)!r} is whole on some ranks and sharded on others"
                )
        if first.extents is None:
            held_by = [rank for rank, _ in held]
            _check_once(held_by, first)
            units.append((first, held_by))
            continue
        # a stable sort: the holders of each piece stay in rank order
        held.sort(key=_extents_of)
        extents: list[Extents] = []
        previous: Extents | None = None
        for rank, item in held:
            assert item.extents is not None
            if item.extents == previous:
                held_by.append(rank)
                continue
            previous = item.extents
            extents.append(previous)
            held_by = [rank]
            units.append((item, held_by))
        for _, held_by in units[len(units) - len(extents) :]:
            if len(held_by) > 1:
                _check_once(held_by, first)
        try:
            check_tiling(first.shape, extents)
        except ValueError as exc:
            raise PlanError(
                f"the pieces of {key_from_bytes(key)!r} do not tile its shape {first.shape}: {exc}"
            ) from None
        holders[key] = BundleEntry(first.dtype, first.shape, slices=tuple(extents))

    # Who writes each unit: forced ones first, then replicas, largest first, least loaded.
    loads = [0] * world
    owned: list[list[Item]] = [[] for _ in range(world)]
    replicas: list[tuple[Item, list[int]]] = []
    for item, ranks in units:
        if len(ranks) == 1:
            owned[ranks[0]].append(item)
            loads[ranks[0]] += item.nbytes
        else:
            replicas.append((item, ranks))
    replicas.sort(key=lambda u: (-u[0].nbytes, u[0].key, u[0].extents or ()))
    for item, ranks in replicas:
        rank = min(ranks, key=lambda r: (loads[r], r))
        owned[rank].append(item)
        loads[rank] += item.nbytes

    shards: list[tuple[tuple[Item, ...], ...]] = []
    one_file = not options.sharded
    for items in owned:
        if not items:
            shards.append(())
            continue
        if one_file:  # the default: each rank's share is one data file
            shards.append(one_file_in_key_order(items))
            continue
        keyed = sorted(((item.data_key, item) for item in items), key=itemgetter(0))
        labels = {key_from_bytes(key): item for key, item in keyed}
        sizes = [(label, item.nbytes) for label, item in labels.items()]
        planned = plan_shards(sizes, options)
        shards.append(tuple(tuple(labels[label] for label in group) for group in planned if group))
    if not any(shards):  # an empty checkpoint still has one (empty) data file
        shards[0] = ((),)
    first_shard: list[int] = []
    total = 0
    for per_rank in shards:
        first_shard.append(total)
        total += len(per_rank)
    return Plan(total, tuple(shards), tuple(first_shard), holders)


def _key_order(item: Item) -> tuple[bool, bytes, int, Extents]:
    """Sorts as ``item.data_key`` does, without encoding it: a slice key is the ordered code
    of (0, name, rank, start, length, ...), which keeps the order of those numbers and names,
    and sorts before every whole name that does not start with a zero byte."""
    extents = item.extents
    if extents is None:
        return (True, item.key, 0, ())
    return (False, item.key, len(extents), extents)


def one_file_in_key_order(items: Sequence[Item]) -> tuple[tuple[Item, ...]]:
    """One data file of ``items``, in data-key order (the order of its index entries)."""
    if any(item.extents is None and item.key[:1] == b"\0" for item in items):
        return (tuple(sorted(items, key=lambda item: item.data_key)),)
    return (tuple(sorted(items, key=_key_order)),)


@dataclass(frozen=True)
class Assignment:
    """What the primary sends one rank after planning: the data files the rank writes, each as
    positions in the rank's own manifest (so its size is that of the rank's share), or the
    error that stops the save on every rank."""

    num_shards: int = 0
    first_shard: int = 0
    files: tuple[tuple[int, ...], ...] = ()
    error: str | None = None
    plan_error: bool = False  # the error is a PlanError (the ranks' states do not fit)

    def files_of(self, items: Sequence[Item]) -> list[tuple[int, tuple[Item, ...]]]:
        """(shard number, items) of the data files this rank writes, from its own items."""
        return [
            (self.first_shard + i, tuple(items[position] for position in positions))
            for i, positions in enumerate(self.files)
        ]


def assign(plan: Plan, manifests: Sequence[Manifest]) -> list[Assignment]:
    """Each rank's share of ``plan`` (index = rank), in terms of that rank's own manifest."""
    with cyclic_gc_paused():
        return _assign(plan, manifests)


def _assign(plan: Plan, manifests: Sequence[Manifest]) -> list[Assignment]:
    out: list[Assignment] = []
    for rank, manifest in enumerate(manifests):
        position = {item.unit: i for i, item in enumerate(manifest.items)}
        files = tuple(tuple(position[item.unit] for item in items) for items in plan.shards[rank])
        out.append(Assignment(plan.num_shards, plan.first_shard[rank], files))
    return out


def _name(item: Item) -> str:
    name = repr(key_from_bytes(item.key))
    return name if item.extents is None else f"the piece {item.extents} of {name}"


def _extents_of(held: tuple[int, Item]) -> Extents:
    extents = held[1].extents
    assert extents is not None
    return extents


def _check_once(ranks: list[int], item: Item) -> None:
    """Ranks come in order: a rank listed twice holds ``item`` twice."""
    for a, b in pairwise(ranks):
        if a == b:
            raise PlanError(f"rank {a} holds {_name(item)} twice")


def _mismatch(item: Item, other: Item, rank: int, other_rank: int) -> NoReturn:
    raise PlanError(
        f"{_name(item)} differs between ranks: rank {other_rank} has dtype enum {other.dtype} "
        f"and shape {other.shape}, rank {rank} dtype enum {item.dtype} and shape {item.shape}"
    )

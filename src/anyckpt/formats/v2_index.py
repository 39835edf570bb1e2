"""Building a V2 bundle's ``.index``: the header entry, then one entry per tensor (and per
slice of a partitioned tensor), in bytewise key order, as TensorFlow's table."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .._concurrency import cyclic_gc_paused
from .._recent import RecentCache
from ..codecs.bundle import HEADER_KEY, BundleEntry, encode_entry, encode_header
from ..codecs.bundle_packed import encode_entries, entry_head
from ..codecs.packed import Column, HeadedBytes, PackedBytes, bytes_column
from ..codecs.table_packed import TableBuild, TableLayout, replace_value_tails
from ..storage import Storage
from .v2_data import DataFileEntries, Kind

#: Largest template kept (its index, layout and names, about); the last 4 structures' are.
_TEMPLATE_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class _Template:
    """The index of one data file's entries, kept to be patched when the same structure is
    saved again. A trainer saves the same tensors (names, dtypes, shapes, so offsets and
    sizes) step after step; between two such saves only each entry's ``crc32c`` changes, and
    it is the last field of its value, four bytes wide whenever it is not zero. So the next
    index is this one with those four bytes replaced and the data blocks' trailers recomputed:
    the same bytes as building it again, for a fraction of the work."""

    shard_id: int
    kind_ids: np.ndarray
    kinds: list[Kind]
    offsets: np.ndarray
    sizes: np.ndarray
    table: tuple[bytes, ...]  # its pieces, as built (joined only when patched)
    layout: TableLayout
    name_lengths: np.ndarray | None  # packed names' lengths (their bytes are in the cache key)

    def fits(self, entries: DataFileEntries) -> bool:
        return (
            self.shard_id == entries.shard_id
            and _same_lengths(self.name_lengths, entries.keys)
            and self.kinds == entries.kinds
            and np.array_equal(self.kind_ids, entries.kind_ids)
            and np.array_equal(self.offsets, entries.offsets)
            and np.array_equal(self.sizes, entries.sizes)
        )

    def patched(self, crcs: np.ndarray) -> bytes:
        tails = crcs.astype("<u4").view(np.uint8).reshape(-1, 4)
        entries = np.arange(1, len(crcs) + 1)  # entry 0 is the header
        return replace_value_tails(self.table, self.layout, entries, tails)


_TemplateKey = tuple[int, Hashable]
_TEMPLATES: RecentCache[_TemplateKey, _Template] = RecentCache(4)


def _increasing(keys: Sequence[bytes]) -> bool:
    """Whether ``keys`` strictly increase (known for the packed, sorted names of a save)."""
    if isinstance(keys, PackedBytes) and keys.increasing:
        return True
    return all(a < b for a, b in itertools.pairwise(keys))


def _names_key(keys: Sequence[bytes]) -> Hashable:
    """The names, hashable, for the templates' cache (packed: their bytes and how many, no
    copy of their lengths: a template keeps those and checks them, see :func:`_same_lengths`)."""
    if isinstance(keys, PackedBytes):
        return (keys.data, len(keys))
    return tuple(keys)


def _same_lengths(kept: np.ndarray | None, keys: Sequence[bytes]) -> bool:
    """Whether packed ``keys`` have the ``kept`` lengths (the rest of their identity is the
    cache key); other keys are their own cache key."""
    if not isinstance(keys, PackedBytes):
        return kept is None
    return kept is not None and np.array_equal(kept, keys.lengths)


def _surely_too_large(entries: DataFileEntries, heads: Sequence[bytes]) -> bool:
    """Whether the index of ``entries`` (every CRC present) is surely too large to keep as a
    template, before building it: each entry takes at least its three length varints, its
    head, a five-byte CRC field, and two bytes for a non-zero size and for a non-zero offset."""
    count = len(entries.keys)
    least = count * (3 + min(map(len, heads), default=0) + 5)
    least += 2 * int(np.count_nonzero(entries.sizes) + np.count_nonzero(entries.offsets))
    return 2 * least > _TEMPLATE_MAX_BYTES


def _keep_template(
    key: _TemplateKey, entries: DataFileEntries, table: Sequence[bytes], layout: TableLayout
) -> None:
    """Remember the index of ``entries`` unless it is too large to be worth holding (checked
    before copying anything: a save too large to keep one makes no copies of its columns)."""
    held = 2 * sum(map(len, table)) + layout.entry_ends.nbytes  # the names ~ the table
    if held > _TEMPLATE_MAX_BYTES:  # a huge structure's index costs less to build than to hold
        return
    template = _Template(
        entries.shard_id,
        entries.kind_ids.copy(),
        list(entries.kinds),
        entries.offsets.copy(),
        entries.sizes.copy(),
        tuple(table),
        layout,
        entries.keys.lengths.copy() if isinstance(entries.keys, PackedBytes) else None,
    )
    _TEMPLATES.put(key, template)


def build_index(
    num_shards: int,
    files: Sequence[DataFileEntries],
    holders: Mapping[bytes, BundleEntry] | None = None,
) -> bytes:
    """The ``.index`` table for the entries of every data file plus ``holders`` (the full-name
    entries of partitioned tensors, which point at their slices' entries)."""
    return b"".join(index_pieces(num_shards, files, holders))


def write_index(
    storage: Storage,
    path: str,
    num_shards: int,
    files: Sequence[DataFileEntries],
    holders: Mapping[bytes, BundleEntry] | None = None,
    *,
    durable: bool = True,
) -> None:
    """Write the index :func:`build_index` builds to ``path``, a range of its data blocks at
    a time where the storage writes pieces as they come (local disk): the whole table is
    never in memory, nor all its entries' values."""
    storage.write_pieces(path, index_pieces(num_shards, files, holders), durable=durable)


def index_pieces(
    num_shards: int,
    files: Sequence[DataFileEntries],
    holders: Mapping[bytes, BundleEntry] | None = None,
) -> Iterator[bytes]:
    """:func:`build_index`'s table as pieces, made as they are asked for (see
    :class:`~anyckpt.codecs.table_packed.TableBuild`). The cyclic garbage collector is paused
    while each piece is made (a merge over many ranks: millions of keys, no cycles), not
    while the caller writes it, nor if the caller stops early."""
    pieces = _index_pieces(num_shards, files, holders)
    while True:
        with cyclic_gc_paused():
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece


def _index_pieces(
    num_shards: int,
    files: Sequence[DataFileEntries],
    holders: Mapping[bytes, BundleEntry] | None,
) -> Iterator[bytes]:
    holders = holders or {}
    # One data file of ordinary entries, every CRC present (a zero one is left out of its
    # entry, which changes the layout): the structure's template, if it was saved before.
    # A structure whose index is surely too large to keep has none kept: not looked up.
    in_order = all(_increasing(f.keys) for f in files)
    heads = [entry_head(*kind) for kind in files[0].kinds] if len(files) == 1 else [None]
    reusable = (
        len(files) == 1
        and not holders
        and bool(files[0].crcs.all())
        and in_order
        and None not in heads  # (no protobuf entry)
        and not _surely_too_large(files[0], heads)  # type: ignore[arg-type]  # (no None)
    )
    if reusable:
        template_key = (num_shards, _names_key(files[0].keys))
        template = _TEMPLATES.get(template_key)
        if template is not None and template.fits(files[0]):
            yield template.patched(files[0].crcs)
            return
    build = None
    if len(files) == 1 and not holders and in_order:
        build = _one_file_table(num_shards, files[0])
    if build is None:
        build = _merged_table(num_shards, files, holders, in_order)
    if not reusable:
        build.drop_layout()
        yield from build.pieces()
        return
    kept: list[bytes] | None = []  # the table, while small enough to keep as a template
    for piece in build.pieces():
        yield piece
        if kept is not None:
            kept.append(piece)
            if 2 * build.size > _TEMPLATE_MAX_BYTES:  # too large to keep: see _keep_template
                kept = None
                build.drop_layout()
    layout = build.layout
    if kept is not None and layout is not None:
        _keep_template(template_key, files[0], kept, layout)


def _one_file_table(num_shards: int, entries: DataFileEntries) -> TableBuild | None:
    """The table of one data file's entries in key order with packed names (the usual save),
    or None if its names are not packed or an entry needs protobuf: the entries' values made
    straight from the file's columns a range at a time, the header's entry placed first (no
    copy of every column to make room for it)."""
    keys = entries.keys
    heads = [entry_head(*kind) for kind in entries.kinds]
    if not isinstance(keys, PackedBytes) or None in heads:
        return None
    head_table = bytes_column(heads)  # type: ignore[arg-type]  # (no None among them)
    header = encode_header(num_shards)

    def values(low: int, high: int) -> Column:
        """Table entries ``low:high``'s values: entry 0 is the header's, entry i the data
        file's entry i - 1."""
        first = max(low - 1, 0)  # the data file's entries from here
        rows = slice(first, high - 1)
        kind_ids = entries.kind_ids[rows]
        heads_column = Column(
            head_table.data, head_table.starts[kind_ids], head_table.lengths[kind_ids]
        )
        shard_ids = np.broadcast_to(np.int64(entries.shard_id), (len(kind_ids),))
        return encode_entries(
            heads_column,
            shard_ids,
            entries.offsets[rows],
            entries.sizes[rows],
            entries.crcs[rows],
            first=header if low == 0 else None,
        )

    return TableBuild(HeadedBytes(HEADER_KEY, keys), values)


def _merged_table(
    num_shards: int,
    files: Sequence[DataFileEntries],
    holders: Mapping[bytes, BundleEntry],
    in_order: bool,
) -> TableBuild:
    """The table of any data files' entries (several files, partitioned tensors' holders,
    a file in another order), merged into rows in key order."""
    distinct_heads: dict[bytes, int] = {}  # each distinct encoded head, numbered

    def number(head: bytes) -> int:
        return distinct_heads.setdefault(head, len(distinct_heads))

    # One row per entry (the header's first, the holders' last), filled file by file.
    extra = len(holders)
    total = 1 + sum(len(f.keys) for f in files) + extra
    keys: list[bytes] = [HEADER_KEY]
    ids_all: np.ndarray = np.zeros(total, np.int32)  # each entry's head, numbered
    sharded = any(f.shard_id for f in files)  # else every shard id is 0: no column of them
    shard_ids = np.zeros(total, np.int64) if sharded else np.broadcast_to(np.int64(0), (total,))
    offsets: np.ndarray = np.zeros(total, np.int64)
    sizes: np.ndarray = np.zeros(total, np.int64)
    crc: np.ndarray = np.zeros(total, np.uint32)
    ids_all[0] = number(encode_header(num_shards))
    at = 1
    for entries in files:
        rows = slice(at, at + len(entries.keys))
        at = rows.stop
        keys += entries.keys
        heads = [entry_head(*kind) for kind in entries.kinds]
        if None not in heads:
            ids = np.array([number(head) for head in heads], np.int32)  # type: ignore[arg-type]
            ids_all[rows] = ids[entries.kind_ids]
            if sharded:
                shard_ids[rows] = entries.shard_id
            offsets[rows] = entries.offsets
            sizes[rows] = entries.sizes
            crc[rows] = entries.crcs
        else:  # numbers beyond the hand encoding: protobuf, each entry whole
            ids_all[rows] = [number(encode_entry(e)) for e in entries.as_entries().values()]
    keys += holders
    ids_all[at:] = [number(encode_entry(h)) for h in holders.values()]
    if len(files) > 1 or extra or not in_order:  # a data file in another order (TF2's)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        ids_all, offsets, sizes, crc = (a[order] for a in (ids_all, offsets, sizes, crc))
        if sharded:
            shard_ids = shard_ids[order]
    head_table = bytes_column(list(distinct_heads))
    narrow = np.int32 if len(head_table.data) < 2**31 else np.int64  # (a few distinct heads)
    heads_column = Column(
        head_table.data,
        head_table.starts.astype(narrow)[ids_all],
        head_table.lengths.astype(narrow)[ids_all],
    )
    values = encode_entries(heads_column, shard_ids, offsets, sizes, crc)
    del heads_column, shard_ids, offsets, sizes, crc, ids_all  # encoded
    return TableBuild(keys, values)

"""Building a V2 bundle's ``.index``: the header entry, then one entry per tensor (and per
slice of a partitioned tensor), in bytewise key order, as TensorFlow's table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..codecs.bundle import HEADER_KEY, BundleEntry, encode_entry, encode_header
from ..codecs.bundle_packed import encode_entries, entry_head
from ..codecs.packed import Column, bytes_column
from ..codecs.table_packed import build_table_packed
from .v2_data import DataFileEntries


def build_index(
    num_shards: int,
    files: Sequence[DataFileEntries],
    holders: Mapping[bytes, BundleEntry] | None = None,
) -> bytes:
    """The ``.index`` table for the entries of every data file plus ``holders`` (the full-name
    entries of partitioned tensors, which point at their slices' entries)."""
    holders = holders or {}
    distinct_heads: dict[bytes, int] = {}  # each distinct encoded head, numbered

    def number(head: bytes) -> int:
        return distinct_heads.setdefault(head, len(distinct_heads))

    keys: list[bytes] = [HEADER_KEY]
    head_ids: list[np.ndarray] = [np.array([number(encode_header(num_shards))], np.int64)]
    columns: list[list[np.ndarray]] = [[np.zeros(1, np.int64)] for _ in range(3)]
    crcs: list[np.ndarray] = [np.zeros(1, np.uint32)]
    for entries in files:
        count = len(entries.keys)
        keys += entries.keys
        pairs = list(zip(entries.dtypes, entries.shapes, strict=True))
        heads = {pair: entry_head(*pair) for pair in set(pairs)}
        if None not in heads.values():
            ids = {pair: number(head) for pair, head in heads.items()}  # type: ignore[arg-type]
            head_ids.append(np.fromiter(map(ids.__getitem__, pairs), np.int64, count))
            columns[0].append(np.full(count, entries.shard_id, dtype=np.int64))
            columns[1].append(entries.offsets)
            columns[2].append(entries.sizes)
            crcs.append(entries.crcs)
        else:  # numbers beyond the hand encoding: protobuf, each entry whole
            whole = [number(encode_entry(e)) for e in entries.as_entries().values()]
            head_ids.append(np.array(whole, np.int64))
            for column in columns:
                column.append(np.zeros(count, np.int64))
            crcs.append(np.zeros(count, np.uint32))
    keys += holders
    head_ids.append(np.array([number(encode_entry(h)) for h in holders.values()], np.int64))
    extra = len(holders)
    shard_ids, offsets, sizes = (
        np.concatenate([*column, np.zeros(extra, np.int64)]) for column in columns
    )
    crc = np.concatenate([*crcs, np.zeros(extra, np.uint32)])
    ids_all = np.concatenate(head_ids)
    if len(files) > 1 or extra:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        ids_all, shard_ids, offsets, sizes, crc = (
            a[order] for a in (ids_all, shard_ids, offsets, sizes, crc)
        )
    table = bytes_column(list(distinct_heads))
    heads_column = Column(table.data, table.starts[ids_all], table.lengths[ids_all])
    values = encode_entries(heads_column, shard_ids, offsets, sizes, crc)
    return build_table_packed(keys, values)

"""Building a V2 bundle's ``.index``: the header entry, then one entry per tensor (and per
slice of a partitioned tensor), in bytewise key order, as TensorFlow's table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..codecs.bundle import HEADER_KEY, BundleEntry, encode_entry, encode_header
from ..codecs.bundle_packed import encode_entries, entry_head
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
    keys: list[bytes] = [HEADER_KEY]
    heads: list[bytes] = [encode_header(num_shards)]
    columns: list[list[np.ndarray]] = [[np.zeros(1, np.int64)] for _ in range(3)]
    crcs: list[np.ndarray] = [np.zeros(1, np.uint32)]
    for entries in files:
        count = len(entries.keys)
        keys += entries.keys
        pairs = list(zip(entries.dtypes, entries.shapes, strict=True))
        if all(entry_head(*pair) is not None for pair in set(pairs)):
            heads += [entry_head(*pair) for pair in pairs]  # type: ignore[misc]
            columns[0].append(np.full(count, entries.shard_id, dtype=np.int64))
            columns[1].append(entries.offsets)
            columns[2].append(entries.sizes)
            crcs.append(entries.crcs)
        else:  # numbers beyond the hand encoding: protobuf, each entry whole
            heads += [encode_entry(e) for e in entries.as_entries().values()]
            for column in columns:
                column.append(np.zeros(count, np.int64))
            crcs.append(np.zeros(count, np.uint32))
    for key, holder in holders.items():
        keys.append(key)
        heads.append(encode_entry(holder))
    extra = len(holders)
    shard_ids, offsets, sizes = (
        np.concatenate([*column, np.zeros(extra, np.int64)]) for column in columns
    )
    crc = np.concatenate([*crcs, np.zeros(extra, np.uint32)])
    if len(files) > 1 or extra:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[i] for i in order]
        heads = [heads[i] for i in order]
        shard_ids, offsets, sizes, crc = (a[order] for a in (shard_ids, offsets, sizes, crc))
    values = encode_entries(heads, shard_ids, offsets, sizes, crc)
    return build_table_packed(keys, values)

"""Where a V2 bundle's bytes go: file names, and the sizes that decide how tensors are
written and read (gathered small ones, checksummed-alongside large ones)."""

from __future__ import annotations

from .layout import DATA, INDEX, file_name

#: Largest `.index` file we agree to load into memory.
MAX_INDEX_BYTES = 1 << 31
#: Remote reads of neighbouring tensors are merged into requests of up to this size.
COALESCE_BYTES = 64 << 20


def index_path(prefix: str) -> str:
    """``PREFIX.index`` (the name is :mod:`.layout`'s)."""
    return file_name(prefix, INDEX)


def data_path(prefix: str, shard: int, num_shards: int) -> str:
    """``PREFIX.data-SSSSS-of-NNNNN`` (the name is :mod:`.layout`'s)."""
    return file_name(prefix, DATA, shard, num_shards)


#: Numeric tensors below this size are gathered and written (or read) together, up to
#: IOV_MAX of them per writev/preadv call, straight from (into) their own buffers.
GATHER_BELOW = 256 << 10
#: Bytes gathered before they are written (or read) in one go.
GATHER_BYTES = 8 << 20
#: Tensors of at least this size are checksummed by a second thread, alongside the writes
#: (CRC-32C and write both release the GIL, so they run on two cores), and read and
#: checksummed by two threads (local files).
PARALLEL_BYTES = 4 << 20

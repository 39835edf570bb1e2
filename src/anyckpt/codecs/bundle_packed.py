"""``BundleEntryProto`` records for many tensors at once (the V2 index's values).

Same bytes as :func:`~anyckpt.codecs.bundle.encode_entry` entry by entry: the dtype and shape
fields (one cached encoding per distinct dtype and shape), then ``shard_id``, ``offset``,
``size`` and ``crc32c``, each left out when zero, as protobuf's deterministic serialization
does. Entries that need protobuf itself (partitioned tensors, out-of-range numbers) are passed
in already encoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .bundle import INT32_MAX, encode_head
from .packed import Column, bytes_column, fixed32_column, interleave, varint_column

_HEADS: dict[tuple[int, tuple[int, ...]], bytes | None] = {}
_HEADS_MAX = 4096


def entry_head(dtype: int, shape: tuple[int, ...]) -> bytes | None:
    """The encoded dtype and shape fields of an ordinary entry (cached), or None when a number
    is outside what the hand encoding covers (then use ``encode_entry``)."""
    key = (dtype, shape)
    try:
        return _HEADS[key]
    except KeyError:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        head = _HEADS[key] = encode_head(dtype, shape)
        return head


def encode_entries(
    heads: Column | Sequence[bytes],
    shard_ids: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    crcs: np.ndarray,
    *,
    first: bytes | None = None,
) -> Column:
    """Entry ``i`` is ``heads[i]`` followed by its non-zero ``shard_ids``, ``offsets``,
    ``sizes`` (varints) and masked ``crcs`` (fixed32). A pre-encoded entry is passed as its
    whole encoding in ``heads`` with zeros in the other columns; ``first``, if given, is one
    more, placed before them all (an index's header)."""
    if len(shard_ids) and (shard_ids.min() < 0 or shard_ids.max() > INT32_MAX):
        raise ValueError("shard ids must fit in an int32")
    if len(offsets) and (offsets.min() < 0 or sizes.min() < 0):
        raise ValueError("offsets and sizes must be non-negative")
    return interleave(
        [
            heads if isinstance(heads, Column) else bytes_column(heads),
            varint_column(shard_ids, tag=0x18, omit_zero=True),
            varint_column(offsets, tag=0x20, omit_zero=True),
            varint_column(sizes, tag=0x28, omit_zero=True),
            fixed32_column(crcs, tag=0x35, omit_zero=True),
        ],
        first=first,
    )

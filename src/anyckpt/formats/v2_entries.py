"""A V2 index's entries held as columns once all are decoded: the keys as a few large parts
(:class:`KeyParts`) and their offsets, the entries as NumPy columns
(:class:`~anyckpt.codecs.bundle_batch.EntryColumns`).

A million tiny tensors cost about 40 bytes each here (their key, two int64 offsets, the entry's
columns) instead of the ~450 bytes of a list of keys, a list of decoded tuples and a dict; the
names (``str``) and tuples are made only for the entries asked for.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import overload

import numpy as np

from ..codecs.bundle import EntryRecord
from ..codecs.bundle_batch import EntryColumns
from ..tensors import key_to_bytes

_CHUNK = 1 << 14


class KeyParts:
    """Every key back to back, held in the parts they were added in (no key spans two):
    ``str`` parts while every key is ASCII (nearly always: sliced into names with no decoding),
    else ``bytes``. A part is decoded as it is added, so the whole blob is never held twice (as
    bytes and as text) and never grown by copying."""

    def __init__(self, blob: bytes | bytearray | None = None) -> None:
        self.parts: list[str] | list[bytes] = []
        #: Where each part starts among all the keys' bytes.
        self.starts: list[int] = []
        self.size = 0
        self.is_text = True
        if blob is not None:
            self.add(blob)

    def add(self, blob: bytes | bytearray) -> None:
        """Append the keys ``blob`` holds (whole keys)."""
        self.starts.append(self.size)
        self.size += len(blob)
        if self.is_text and blob.isascii():
            self.parts.append(blob.decode("ascii"))  # type: ignore[arg-type]
            return
        if self.is_text:  # the first non-ASCII key: every part becomes bytes
            self.parts = [str(part).encode("ascii") for part in self.parts]
            self.is_text = False
        self.parts.append(bytes(blob))  # type: ignore[arg-type]

    def part_of(self, offset: int) -> int:
        """The part holding the key that starts at ``offset``."""
        return max(bisect_right(self.starts, offset) - 1, 0)

    def slice(self, start: int, end: int) -> str | bytes:
        """Bytes ``start:end`` (one key) as the part holds them."""
        p = self.part_of(start)
        base = self.starts[p] if self.starts else 0
        part = self.parts[p] if self.parts else ""
        return part[start - base : end - base]

    def part_indices(self, starts: np.ndarray) -> np.ndarray:
        """:meth:`part_of` of many offsets at once."""
        if len(self.starts) <= 1:
            return np.zeros(len(starts), dtype=np.intp)
        found: np.ndarray = np.searchsorted(self.starts, starts, side="right") - 1
        return found

    def part_bytes(self, p: int) -> bytes:
        part = self.parts[p]
        return part.encode("ascii") if isinstance(part, str) else part


class EntryTable:
    """Every entry of an index (after its header), in key order."""

    def __init__(
        self, keys: KeyParts | bytes | bytearray, key_offsets: np.ndarray, entries: EntryColumns
    ) -> None:
        #: Entry ``i``'s key is bytes ``key_offsets[i]:key_offsets[i + 1]`` of ``keys``.
        self.key_offsets = key_offsets
        self.entries = entries
        #: Which entries are tensors of their own (False: the slices of a partitioned
        #: tensor); None if every entry is.
        self.listed: np.ndarray | None = None
        self._keys = keys if isinstance(keys, KeyParts) else KeyParts(keys)
        self._last = -1  # the position last found by name

    def __len__(self) -> int:
        return len(self.key_offsets) - 1

    def raw(self, i: int) -> bytes:
        key = self._keys.slice(int(self.key_offsets[i]), int(self.key_offsets[i + 1]))
        return key.encode("ascii") if isinstance(key, str) else key

    def name(self, i: int) -> str:
        return self.names(np.array([i]))[0]

    def names(self, positions: np.ndarray) -> list[str]:
        """The keys at ``positions``, decoded as :func:`~anyckpt.tensors.key_from_bytes`
        (a chunk at a time: no list of a million offsets)."""
        out: list[str] = []
        keys = self._keys
        for lo in range(0, len(positions), _CHUNK):
            chunk = positions[lo : lo + _CHUNK]
            starts = self.key_offsets[chunk]
            ends = self.key_offsets[chunk + 1]
            where = keys.part_indices(starts)
            # Runs of positions whose keys share a part (one run, for a listing in order).
            cuts = [0, *(np.flatnonzero(where[1:] != where[:-1]) + 1).tolist(), len(chunk)]
            for a, b in pairwise(cuts):
                if a == b:
                    continue
                p = int(where[a])
                part, base = keys.parts[p], keys.starts[p]
                run = zip((starts[a:b] - base).tolist(), (ends[a:b] - base).tolist(), strict=True)
                if isinstance(part, str):
                    out += [part[s:e] for s, e in run]
                else:
                    out += [part[s:e].decode("utf-8", "surrogateescape") for s, e in run]
        return out

    def starting_with_nul(self) -> np.ndarray:
        """The positions of the keys whose first byte is NUL (slices of partitioned tensors)."""
        starts = self.key_offsets[:-1]
        nonempty = np.flatnonzero(self.key_offsets[1:] > starts)
        keys = self._keys
        where = keys.part_indices(starts[nonempty])
        first = np.empty(len(nonempty), dtype=np.uint8)
        for p in np.unique(where).tolist():
            chosen = where == p
            part = np.frombuffer(keys.part_bytes(p), dtype=np.uint8)
            first[chosen] = part[starts[nonempty[chosen]] - keys.starts[p]]
        out: np.ndarray = nonempty[first == 0]
        return out

    def record(self, i: int) -> EntryRecord:
        return self.entries.record(i)

    def position(self, raw: bytes) -> int | None:
        """The position of the entry whose key is ``raw``, or None (a binary search)."""
        n = len(self)
        i = bisect_left(range(n), raw, key=self.raw)
        return i if i < n and self.raw(i) == raw else None

    def position_of_name(self, key: str) -> int | None:
        """:meth:`position` of a tensor name (of ASCII keys: compared as str, no bytes made)."""
        keys = self._keys
        if not keys.is_text:
            try:
                return self.position(key_to_bytes(key))
            except (AttributeError, UnicodeError):
                return None
        if not isinstance(key, str) or not key.isascii():
            return None  # every key is ASCII
        offsets = self.key_offsets

        def at(i: int) -> str:
            return keys.slice(int(offsets[i]), int(offsets[i + 1]))  # type: ignore[return-value]

        n = len(self)
        # Names are mostly asked for in order (a listing): try the one after the last first.
        nxt = self._last + 1
        if nxt < n and at(nxt) == key:
            self._last = nxt
            return nxt
        i = bisect_left(range(n), key, key=at)
        if i < n and at(i) == key:
            self._last = i
            return i
        return None

    def listed_position(self, key: str) -> int | None:
        """:meth:`position_of_name` of a tensor's own entry (None for a partitioned tensor's
        slice entries, which are not tensors of their own)."""
        at = self.position_of_name(key)
        if at is None or (self.listed is not None and not self.listed[at]):
            return None
        return at

    def listed_positions(self) -> np.ndarray:
        """The positions of the tensors' entries, in key order."""
        if self.listed is None:
            return np.arange(len(self))
        return np.flatnonzero(self.listed)


class ListedNames(Sequence[str]):
    """The tensors' names of an :class:`EntryTable`, in key order, made as they are asked
    for: a listing of a million tensors holds no list of a million ``str``."""

    def __init__(self, table: EntryTable) -> None:
        self._table = table
        #: Positions of the listed entries; None: every entry is listed.
        self._positions = None if table.listed is None else np.flatnonzero(table.listed)

    def __len__(self) -> int:
        return len(self._table) if self._positions is None else len(self._positions)

    def _at(self, lo: int, hi: int) -> np.ndarray:
        if self._positions is None:
            return np.arange(lo, hi)
        out: np.ndarray = self._positions[lo:hi]
        return out

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(lo, hi, step)]
            return self._table.names(self._at(lo, max(lo, hi)))
        n = len(self)
        if not -n <= i < n:
            raise IndexError("name index out of range")
        i %= n
        return self._table.name(i if self._positions is None else int(self._positions[i]))

    def __iter__(self) -> Iterator[str]:
        for lo in range(0, len(self), _CHUNK):
            yield from self._table.names(self._at(lo, min(lo + _CHUNK, len(self))))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._table.listed_position(key) is not None

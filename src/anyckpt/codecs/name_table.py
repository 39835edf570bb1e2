"""Many names held as columns: one byte blob and int64 offsets, in byte order (issue 13, item 7).

Used by the plugins' header parsers (safetensors, zstd) to keep a million tensor names in ~16
bytes each plus their own bytes, instead of a ``str`` and a dict slot each: a ``str`` is made only
for a name asked for (or for a listing). :func:`byte_order` sorts such a blob without a Python
object per name (the names padded to a fixed width, a NumPy ``lexsort``), and :func:`gather`
puts it in that order.
"""

from __future__ import annotations

import codecs
from bisect import bisect_left

import numpy as np

_CHUNK = 1 << 14
#: The padded copy :func:`byte_order` may make: this many bytes, or 4x the names' own bytes.
_PAD_BYTES = 64 << 20


def byte_order(blob: bytes, ends: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """(the permutation that puts the names ``blob[ends[i]:ends[i + 1]]`` in byte order, or None
    when they already are; whether a name occurs more than once)."""
    n = len(ends) - 1
    if n < 2:
        return None, False
    lengths = np.diff(ends)
    width = max(int(lengths.max()), 1)
    if n * width > max(_PAD_BYTES, 4 * len(blob)):  # a few very long names: sort in Python
        ordered = sorted(range(n), key=lambda i: blob[int(ends[i]) : int(ends[i + 1])])
        order = np.array(ordered, dtype=np.int64)
        blob, ends = gather(blob, ends, order)
        return order, first_duplicate(blob, ends) is not None
    fixed = _padded(blob, ends, lengths, width)
    # Zero padding compares like the bytes, except that "a" and "a\0" pad alike: the length
    # breaks that tie (the shorter first, as bytes compare).
    same = fixed[:-1] == fixed[1:]
    if bool(np.all((fixed[:-1] < fixed[1:]) | (same & (lengths[:-1] < lengths[1:])))):
        return None, False
    del same
    order = np.lexsort((lengths, fixed))
    fixed, lengths = fixed[order], lengths[order]
    duplicated = bool(np.any((fixed[:-1] == fixed[1:]) & (lengths[:-1] == lengths[1:])))
    return order, duplicated


def _padded(blob: bytes, ends: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """The names as a NumPy ``S<width>`` array (zero padded); a view of ``blob`` when every name
    has that width."""
    n = len(lengths)
    if len(blob) == n * width and bool(np.all(lengths == width)):
        return np.frombuffer(blob, dtype=f"S{width}")
    grid = np.zeros((n, width), dtype=np.uint8)
    raw = np.frombuffer(blob, dtype=np.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        lens = lengths[lo:hi]
        first, last = int(ends[lo]), int(ends[hi])
        rows = np.repeat(np.arange(lo, hi), lens)
        cols = np.arange(last - first) - np.repeat(ends[lo:hi] - first, lens)
        grid[rows, cols] = raw[first:last]
    return grid.reshape(-1).view(f"S{width}")


def first_duplicate(blob: bytes, ends: np.ndarray) -> int | None:
    """The position of the first name equal to the one before it (the names in byte order)."""
    n = len(ends) - 1
    for lo in range(1, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        starts = ends[lo - 1 : hi].tolist()
        stops = ends[lo : hi + 1].tolist()
        for i in range(1, len(starts)):
            a, b = starts[i - 1], stops[i - 1]
            c, d = starts[i], stops[i]
            if b - a == d - c and blob[a:b] == blob[c:d]:
                return lo + i - 1
    return None


def valid_utf8(data: bytes) -> bool:
    """Whether ``data`` is UTF-8, checked a piece at a time (no ``str`` of all of it)."""
    if data.isascii():
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    try:
        for at in range(0, len(view), 1 << 20):
            decoder.decode(view[at : at + (1 << 20)])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def gather(blob: bytes, ends: np.ndarray, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The names ``rows`` of a blob cut at ``ends`` (``ends[0] == 0``), and their new ends."""
    starts, stops = ends[:-1][rows], ends[1:][rows]
    out = bytearray()
    for lo in range(0, len(rows), _CHUNK):
        pieces = zip(
            starts[lo : lo + _CHUNK].tolist(), stops[lo : lo + _CHUNK].tolist(), strict=True
        )
        for a, b in pieces:
            out += blob[a:b]
    new_ends = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(stops - starts, out=new_ends[1:])
    return bytes(out), new_ends


class NameTable:
    """Names in strictly increasing byte order: entry ``i``'s name is
    ``blob[ends[i]:ends[i + 1]]``, decoded as UTF-8 with ``errors``."""

    def __init__(self, blob: bytes, ends: np.ndarray, errors: str = "strict") -> None:
        # Pure ASCII names (nearly always): kept as one str, sliced at the same offsets.
        self._text = blob.decode("ascii") if blob.isascii() else None
        self._blob = b"" if self._text is not None else blob
        self._ends = ends
        #: The same offsets, indexed as Python ints (a NumPy scalar per index is ~3x slower).
        self._at = np.ascontiguousarray(ends, dtype=np.int64).data
        self._count = len(ends) - 1
        self._errors = errors
        self._last = -1  # the position last found by name

    def __len__(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """What the table holds (names and offsets)."""
        held = len(self._text) if self._text is not None else len(self._blob)
        return held + self._ends.nbytes

    def name(self, i: int) -> str:
        a, b = self._at[i], self._at[i + 1]
        if self._text is not None:
            return self._text[a:b]
        return self._blob[a:b].decode("utf-8", self._errors)

    def names(self, lo: int = 0, hi: int | None = None) -> list[str]:
        """The names at positions ``[lo, hi)`` (a chunk of offsets at a time)."""
        hi = len(self) if hi is None else min(hi, len(self))
        out: list[str] = []
        text, blob, errors = self._text, self._blob, self._errors
        for start in range(lo, hi, _CHUNK):
            stop = min(start + _CHUNK, hi)
            firsts = self._ends[start:stop].tolist()
            lasts = self._ends[start + 1 : stop + 1].tolist()
            if text is not None:
                out += [text[a:b] for a, b in zip(firsts, lasts, strict=True)]
            else:
                out += [
                    blob[a:b].decode("utf-8", errors) for a, b in zip(firsts, lasts, strict=True)
                ]
        return out

    def position(self, key: object) -> int | None:
        """The position of ``key``, or None: the one after the last found first (names are
        mostly asked for in order), else a binary search."""
        if not isinstance(key, str):
            return None
        ends, n, nxt = self._at, self._count, self._last + 1
        text = self._text
        if text is not None:
            if not key.isascii():
                return None  # every name is ASCII
            if nxt < n and text[ends[nxt] : ends[nxt + 1]] == key:
                self._last = nxt
                return nxt
            i = bisect_left(range(n), key, key=lambda i: text[ends[i] : ends[i + 1]])
            if i >= n or text[ends[i] : ends[i + 1]] != key:
                return None
            self._last = i
            return i
        try:
            target = key.encode("utf-8", self._errors)
        except UnicodeError:
            return None
        blob = self._blob

        def at(i: int) -> bytes:
            return blob[ends[i] : ends[i + 1]]

        if nxt < n and at(nxt) == target:
            i = nxt
        else:
            i = bisect_left(range(n), target, key=at)
            if i >= n or at(i) != target:
                return None
        if self.name(i) != key:
            return None  # another spelling of the same bytes (surrogateescape)
        self._last = i
        return i

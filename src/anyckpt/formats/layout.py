"""Checkpoint file names: which files of a directory may belong to a checkpoint prefix."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class NameIndex:
    """The names in a directory, sorted, to ask in O(log n) whether a file may belong to a
    checkpoint: one named as its prefix, or starting with it and a ``.`` or ``-``
    (``ckpt-5.index``, ``ckpt-5-00000-of-00002``, ``ckpt-5.zst``, ``ckpt-5.meta``...)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = sorted(names)

    def _starts(self, text: str) -> bool:
        i = bisect.bisect_left(self._names, text)
        return i < len(self._names) and self._names[i].startswith(text)

    def may_hold(self, prefix: str) -> bool:
        stem = prefix.split("-?", 1)[0]  # a V1 pattern: ``ckpt-5-?????-of-00002``
        i = bisect.bisect_left(self._names, stem)
        exact = i < len(self._names) and self._names[i] == stem
        return exact or self._starts(stem + ".") or self._starts(stem + "-")

    def belonging(self, prefix: str) -> list[str]:
        """The names that may belong to ``prefix`` (as :meth:`may_hold` asks), in O(log n +
        the names returned)."""
        stem = prefix.split("-?", 1)[0]
        names = self._names
        out: list[str] = []
        i = bisect.bisect_left(names, stem)
        if i < len(names) and names[i] == stem:
            out.append(stem)
        for start in (stem + ".", stem + "-"):
            i = bisect.bisect_left(names, start)
            while i < len(names) and names[i].startswith(start):
                out.append(names[i])
                i += 1
        return out

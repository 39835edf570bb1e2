"""The tensors of an open V1 checkpoint held as columns (issue 13, defect 7).

Nearly every tensor of a V1 checkpoint is stored whole, as one slice in one file. Those are
kept as columns, in key order: the names as one blob and their offsets, the dtype, the file,
and the dimensions (one flat array and offsets): about 40 bytes per tensor instead of the
~600 of a protobuf message, a :class:`~anyckpt.codecs.v1.MetaTensor` and a dict entry each.
The few others (partitioned tensors, tensors spread over several files, duplicates) are kept
as :class:`V1Tensor` objects by name. A :class:`V1Tensor` is made only for a tensor asked for.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..codecs import v1 as codec
from ..codecs.name_table import gather
from ..codecs.ordered_code import Extent
from ..tensors import key_from_bytes, key_to_bytes

Extents = tuple[Extent, ...]
_CHUNK = 1 << 14


@dataclass(slots=True)
class V1Tensor:
    """A tensor across the files of a checkpoint: every stored slice and where it is."""

    enum: int
    shape: tuple[int, ...]
    slices: list[tuple[Extents, int]] = field(default_factory=list)  # (extents, file index)

    @property
    def whole(self) -> bool:
        return len(self.slices) == 1 and all(n == -1 for _, n in self.slices[0][0])


class TensorColumnsBuilder:
    """Collects the meta of each file (in file order) into a :class:`TensorColumns`.

    ``merge(name, tensor, meta, file)`` is called for every tensor kept as an object: it
    checks the meta against what is already known of the tensor and adds its slices."""

    def __init__(self, merge: Callable[[str, V1Tensor | None, codec.MetaTensor, int], V1Tensor]):
        self._merge = merge
        self._names = bytearray()
        self._name_ends = array("q", [0])
        self._enums = array("i")
        self._files = array("i")
        self._dims = array("q")
        self._dim_ends = array("q", [0])
        self._file_rows: list[tuple[int, int, bool]] = []  # (first row, end, sorted)
        self.others: dict[str, V1Tensor] = {}

    def add_file(self, index: int, metas: Iterable[codec.MetaTensor]) -> None:
        first = len(self._enums)
        ordered = True
        last: bytes | None = None
        for meta in metas:
            if len(meta.slices) != 1 or any(n != -1 for _, n in meta.slices[0]):
                name = key_from_bytes(meta.name)
                self.others[name] = self._merge(name, self.others.get(name), meta, index)
                continue
            if last is not None and meta.name <= last:
                ordered = False
            last = meta.name
            self._names += meta.name
            self._name_ends.append(len(self._names))
            self._enums.append(meta.dtype)
            self._files.append(index)
            self._dims.extend(meta.shape)
            self._dim_ends.append(len(self._dims))
        self._file_rows.append((first, len(self._enums), ordered))

    def _raw(self, row: int) -> bytes:
        return bytes(self._names[self._name_ends[row] : self._name_ends[row + 1]])

    def _meta(self, row: int) -> codec.MetaTensor:
        shape = tuple(self._dims[self._dim_ends[row] : self._dim_ends[row + 1]])
        return codec.MetaTensor(self._raw(row), self._enums[row], shape, (codec.whole(len(shape)),))

    def _rows_in_order(self) -> Iterator[tuple[bytes, int]]:
        streams = []
        for first, end, ordered in self._file_rows:
            rows: Iterable[int] = range(first, end)
            if not ordered:  # a file not in key order (not written by TF nor anyckpt)
                rows = sorted(rows, key=self._raw)
            streams.append((self._raw(r), r) for r in rows)
        return heapq.merge(*streams) if len(streams) > 1 else streams[0] if streams else iter(())

    def build(self) -> TensorColumns:
        """The columns of the tensors kept whole in one file, in key order; a name met more
        than once, or also among :attr:`others`, joins :attr:`others`."""
        order = array("q")
        identity = True
        for raw, group in itertools.groupby(self._rows_in_order(), key=lambda item: item[0]):
            rows = [row for _, row in group]
            name = key_from_bytes(raw) if len(rows) > 1 or self.others else None
            if name is not None and (len(rows) > 1 or name in self.others):
                for row in rows:
                    self.others[name] = self._merge(
                        name, self.others.get(name), self._meta(row), self._files[row]
                    )
                identity = False
                continue
            if rows[0] != len(order):
                identity = False
            order.append(rows[0])
        name_ends = np.frombuffer(self._name_ends, dtype=np.int64)
        dim_ends = np.frombuffer(self._dim_ends, dtype=np.int64)
        enums = np.frombuffer(self._enums, dtype=np.int32)
        files = np.frombuffer(self._files, dtype=np.int32)
        dims = np.frombuffer(self._dims, dtype=np.int64)
        names = bytes(self._names)
        if not identity or len(order) != len(enums):
            picked = np.frombuffer(order, dtype=np.int64)
            names, name_ends = gather(names, name_ends, picked)
            dims_kept, dim_ends = gather(dims.tobytes(), dim_ends * 8, picked)
            dims, dim_ends = np.frombuffer(dims_kept, dtype=np.int64), dim_ends // 8
            enums, files = enums[picked], files[picked]
        return TensorColumns(
            names, name_ends.copy(), enums.copy(), files.copy(), dims.copy(), dim_ends.copy()
        )


class TensorColumns:
    """The tensors stored whole in one file, in key order, as columns."""

    def __init__(
        self,
        names: bytes,
        name_ends: np.ndarray,
        enums: np.ndarray,
        files: np.ndarray,
        dims: np.ndarray,
        dim_ends: np.ndarray,
    ) -> None:
        # Pure ASCII names (nearly always): kept as one str, sliced at the same offsets.
        self._text = names.decode("ascii") if names.isascii() else None
        self._names = b"" if self._text is not None else names
        self._name_ends = name_ends
        self._enums = enums
        self._files = files
        self._dims = dims
        self._dim_ends = dim_ends
        self._last = -1  # the row last found by name

    def __len__(self) -> int:
        return len(self._enums)

    def nbytes(self) -> int:
        """What the columns hold (for the memory tests)."""
        return (
            len(self._text if self._text is not None else self._names)
            + sum(a.nbytes for a in (self._name_ends, self._enums, self._files))
            + self._dims.nbytes
            + self._dim_ends.nbytes
        )

    def _name(self, row: int) -> str:
        a, b = int(self._name_ends[row]), int(self._name_ends[row + 1])
        if self._text is not None:
            return self._text[a:b]
        return key_from_bytes(self._names[a:b])

    def names(self) -> Iterator[str]:
        """Every name, in key order (a chunk of offsets at a time)."""
        text, names = self._text, self._names
        n = len(self)
        for lo in range(0, n, _CHUNK):
            hi = min(lo + _CHUNK, n)
            starts = self._name_ends[lo:hi].tolist()
            ends = self._name_ends[lo + 1 : hi + 1].tolist()
            if text is not None:
                yield from (text[a:b] for a, b in zip(starts, ends, strict=True))
            else:
                yield from (key_from_bytes(names[a:b]) for a, b in zip(starts, ends, strict=True))

    def row(self, key: str) -> int | None:
        """The row of ``key``, or None: the row after the last one found first (names are
        mostly asked for in order), else a binary search."""
        n = len(self)
        if self._text is not None:
            if not isinstance(key, str) or not key.isascii():
                return None
            target: str | bytes = key
            at: Callable[[int], str | bytes] = self._name
        else:
            try:
                target = key_to_bytes(key)
            except (AttributeError, UnicodeError, TypeError):
                return None
            ends = self._name_ends

            def at(i: int) -> bytes:
                return self._names[int(ends[i]) : int(ends[i + 1])]

        nxt = self._last + 1
        if nxt < n and at(nxt) == target:
            self._last = nxt
            return nxt
        i = bisect_left(range(n), target, key=at)
        if i < n and at(i) == target:
            self._last = i
            return i
        return None

    def tensor(self, row: int) -> V1Tensor:
        shape = tuple(self._dims[self._dim_ends[row] : self._dim_ends[row + 1]].tolist())
        return V1Tensor(
            int(self._enums[row]), shape, [(codec.whole(len(shape)), int(self._files[row]))]
        )

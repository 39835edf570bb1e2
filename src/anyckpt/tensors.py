"""Turning what users pass (NumPy, PyTorch, JAX arrays, scalars, strings) into NumPy arrays."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any, TypeVar, overload

import numpy as np

from ._recent import RecentCache
from .codecs.dtypes import NUMERIC_DTYPES
from .codecs.packed import PackedBytes, row_pieces
from .partitioned import Partitioned
from .to_numpy import to_numpy

_T = TypeVar("_T")


def key_to_bytes(key: str) -> bytes:
    """A tensor name as stored: UTF-8, with surrogate escapes standing for raw bytes."""
    return key.encode("utf-8", "surrogateescape")


#: The last few sets of names saved, by the names: their stored order.
_ORDERS: RecentCache[tuple[str, ...], tuple[PackedBytes, np.ndarray]] = RecentCache(4)
#: Largest set of names remembered (their encoded bytes).
_ORDER_MAX_BYTES = 8 << 20


def stored_key_order(keys: Sequence[str]) -> tuple[PackedBytes, np.ndarray]:
    """The names as stored (:func:`key_to_bytes`) in bytewise order, packed into one bytes
    object with offsets (:class:`~anyckpt.codecs.packed.PackedBytes`: no ``bytes`` object
    per name kept), and the position in ``keys`` of each (a read-only integer array: 4 or 8
    bytes a name, not an int object). The last few sets of names are remembered: a trainer saves the
    same names step after step, and encoding and sorting 10,000 of them costs a millisecond."""
    names = tuple(keys)
    known = _ORDERS.get(names)
    if known is not None:
        return known
    result = _ascii_order(names)
    if result is None:
        result = _general_order(names)
    if len(result[0].data) <= _ORDER_MAX_BYTES:
        _ORDERS.put(names, result)
    return result


#: Fewest names sorted as a NumPy matrix (fewer: the general path is as quick).
_MATRIX_MIN_NAMES = 1024


def _ascii_order(names: tuple[str, ...]) -> tuple[PackedBytes, np.ndarray] | None:
    """:func:`stored_key_order` for many ASCII names without NUL of similar lengths (the
    usual case), else None: the names encoded into one fixed-width NumPy bytes matrix and
    sorted there (``np.argsort``), with no Python object per name (a bytes object and an int
    each, ~80 bytes a name, which the process keeps as its memory high-water mark)."""
    count = len(names)
    if count < _MATRIX_MIN_NAMES:
        return None
    lengths = np.fromiter(map(len, names), dtype=np.int32, count=count)  # (each < 2 GiB)
    total = int(lengths.sum(dtype=np.int64))
    width = int(lengths.max())
    if width == 0 or width * count > 2 * total + 16 * count:  # a few long names: no padding
        return None
    try:
        fixed = np.array(names, dtype=f"S{width}")  # ASCII only: else UnicodeEncodeError
    except UnicodeEncodeError:
        return None
    # NumPy's S dtype ignores trailing NULs when comparing: a NUL in a name, then no.
    if count * width - np.count_nonzero(fixed.view(np.uint8)) != count * width - total:
        return None
    order = np.argsort(fixed, kind="stable")
    if count < 2**31:  # 4 bytes a name, not 8
        order = order.astype(np.int32)
    lengths = lengths[order]
    pieces = row_pieces(fixed.view(np.uint8).reshape(count, width), order, lengths)
    del fixed  # the matrix freed before its pieces are joined
    packed = PackedBytes.from_pieces(pieces, lengths, increasing=True)
    order.flags.writeable = False  # shared by every save of these names
    return packed, order


def _general_order(names: tuple[str, ...]) -> tuple[PackedBytes, np.ndarray]:
    """:func:`stored_key_order` for any names (each encoded and sorted as bytes)."""
    raws = list(map(key_to_bytes, names))
    positions = sorted(range(len(raws)), key=raws.__getitem__)
    # Distinct names encode to distinct bytes (surrogateescape is one to one): increasing.
    packed = PackedBytes.join(map(raws.__getitem__, positions), len(raws), increasing=True)
    del raws
    order = np.array(positions, dtype=np.int64)
    del positions
    order.flags.writeable = False  # shared by every save of these names
    return packed, order


#: Positions turned into ints at once when a :class:`Reordered` is iterated or sliced.
_REORDER_CHUNK = 4096


class Reordered(Sequence[_T]):
    """``items`` taken in ``order`` (item ``i`` is ``items[order[i]]``), looked up on access:
    no list of them (8 bytes an item) and no int object per position at once (32 bytes each
    while a list is built from ``order.tolist()``). Slices are lists; iteration turns a chunk
    of positions into ints at a time."""

    __slots__ = ("_items", "_order")

    def __init__(self, items: Sequence[_T], order: np.ndarray) -> None:
        self._items = items
        self._order = order

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> list[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | list[_T]:
        if isinstance(index, slice):
            return list(map(self._items.__getitem__, self._order[index].tolist()))
        return self._items[int(self._order[index])]

    def __iter__(self) -> Iterator[_T]:
        order, get = self._order, self._items.__getitem__
        chunks = range(0, len(order), _REORDER_CHUNK)
        return chain.from_iterable(
            map(get, order[first : first + _REORDER_CHUNK].tolist()) for first in chunks
        )


def key_from_bytes(raw: bytes) -> str:
    """Inverse of :func:`key_to_bytes`: names that are not valid UTF-8 still round-trip."""
    return raw.decode("utf-8", "surrogateescape")


def normalize_key(key: str | bytes | int) -> str:
    """A name of the state as stored: ``str``, ``bytes``, or an integer written in decimal
    (PyTorch optimizers key their state by parameter number: ``optimizer/state/0/exp_avg``)."""
    if isinstance(key, bytes):
        key = key_from_bytes(key)
    elif isinstance(key, numbers.Integral) and not isinstance(key, (bool, np.bool_)):
        key = str(int(key))
    if not isinstance(key, str):
        raise TypeError(f"tensor names must be str, bytes or int, not {type(key).__name__}")
    if key == "":
        raise ValueError("the empty tensor name is reserved (it holds the bundle header)")
    return key


def as_tensor(value: Any) -> np.ndarray:
    """``value`` as a NumPy array anyckpt can store, without copying numeric data.

    Anything ``numpy.asarray`` accepts works (PyTorch CPU tensors, JAX arrays...). Text
    (``str``, NumPy ``U``/``S`` arrays, object arrays of str/bytes) becomes an object array of
    ``bytes`` (UTF-8 for ``str``). Raises TypeError for dtypes TensorFlow has no name for.
    """
    if type(value) is np.ndarray and value.dtype in NUMERIC_DTYPES:
        return value  # the common case, checked first: a plain numeric array
    if isinstance(value, Partitioned) and value.partitions:  # keep how it is split
        return Partitioned.from_full(as_tensor(value.view(np.ndarray)), value.partitions)
    return to_numpy(value)


def as_named_tensor(name: str, value: Any) -> np.ndarray:
    """:func:`as_tensor`, its errors naming the tensor (``tensor 'optimizer/state/0/exp_avg':
    dtype datetime64[Y] has no TensorFlow equivalent``)."""
    try:
        return as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        kind = next(k for k in (TypeError, ValueError, RuntimeError) if isinstance(exc, k))
        raise kind(f"tensor {name!r}: {exc}") from exc


def flatten(state: Mapping[Any, Any], *, separator: str = "/") -> dict[str, Any]:
    """Flatten nested mappings into ``a/b/c`` names; leaves are left as they are."""
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Mapping[Any, Any]) -> None:
        if type(node) is dict and _plain_level(node):
            # The common case in bulk (no Python per entry): a dict of str names to arrays.
            if not prefix:
                names: Any = node
            else:
                names = list(map(f"{prefix}{separator}".__add__, node))
            if not out or out.keys().isdisjoint(names):
                out.update(node if names is node else zip(names, node.values(), strict=True))
                return
            # A name taken already: the loop below raises the usual error for it.
        for raw_key, value in node.items():
            if type(raw_key) is str and raw_key:
                key = raw_key
            else:
                try:
                    key = normalize_key(raw_key)
                except (TypeError, ValueError) as exc:
                    where = f" (in {prefix!r})" if prefix else ""
                    raise type(exc)(f"{exc}{where}") from None
            name = f"{prefix}{separator}{key}" if prefix else key
            if type(value) is not np.ndarray and isinstance(value, Mapping):
                visit(name, value)
            elif name in out:
                raise ValueError(f"two entries flatten to the same name {name!r}")
            else:
                out[name] = value

    visit("", state)
    return out


def _plain_level(node: dict[Any, Any]) -> bool:
    """Whether ``node`` holds only plain NumPy arrays under non-empty str names (checked in
    bulk: a few C-level passes instead of Python per entry)."""
    return (
        set(map(type, node.values())) <= _NDARRAY
        and set(map(type, node)) <= _STR
        and "" not in node
    )


_NDARRAY = frozenset({np.ndarray})
_STR = frozenset({str})
_dtype_of = attrgetter("dtype")


def prepare(tensors: Mapping[Any, Any], *, share: bool = False) -> dict[str, np.ndarray]:
    """Flatten and normalise a state mapping for a format's ``write``.

    ``share=True``: a flat plain ``dict`` of plain numeric NumPy arrays under non-empty str
    names (checked in bulk) is returned as it is, not copied (a one-shot save, which is done
    with it before it returns; a copy is ~40 bytes a tensor). Anything else (nested, other
    key or value types, a dict subclass) is flattened into a new dict as without it."""
    if (
        share
        and type(tensors) is dict
        and _plain_level(tensors)
        and set(map(_dtype_of, tensors.values())) <= NUMERIC_DTYPES
    ):
        return tensors
    flat = flatten(tensors)
    values = flat.values()
    if set(map(type, values)) <= _NDARRAY and set(map(_dtype_of, values)) <= NUMERIC_DTYPES:
        return flat  # plain numeric arrays only (checked in bulk): as_tensor keeps them as is
    return {key: as_named_tensor(key, value) for key, value in flat.items()}

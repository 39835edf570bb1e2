"""The interface every checkpoint format implements, and the types it speaks in.

A format ("builder") writes a set of named tensors under a prefix and reads them back. The
manager, :mod:`anyckpt.api`, the CLI and retention use only this interface, so a plugin format
is a peer of the built-ins. Formats do their file I/O through :class:`anyckpt.storage.Storage`.

The protocols hold the members every format and reader has. The optional ones (a format's
``options``, ``has_checksums``, ``tf_saver_version`` and ``checkpoint_path``; a reader's
``read_slices``) are declared, with their defaults, on :class:`FormatBase` and
:class:`ReaderBase`, which the built-ins and the bundled plugins inherit. A plugin need not
inherit them: the rest of anyckpt asks for an optional member only through this module's
functions (:func:`declared_options`, :func:`has_checksums`, :func:`tf_saver_version`,
:func:`checkpoint_path`, :func:`read_slices`), which give the base class's default when the
object lacks the member. This module is the only place that looks a hook up by name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import numpy as np

from .._concurrency import run_concurrently
from ..codecs.dtypes import dtype_name

if TYPE_CHECKING:
    from typing_extensions import Self
from ..errors import InvalidOptionError
from ..storage import Storage

Extent = tuple[int, int]  # (start, length); length -1 means the whole dimension
#: What ``read(key, index=...)`` accepts: ints and step-1 slices over the leading axes.
Index = tuple[int | slice, ...] | int | slice | None


@dataclass(frozen=True)
class TensorSlice:
    """One stored piece of a partitioned tensor: an extent per dimension."""

    extents: tuple[Extent, ...]

    def box(self, full_shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """(start, stop) per dimension."""
        return tuple(
            (0, dim) if length == -1 else (start, start + length)
            for (start, length), dim in zip(self.extents, full_shape, strict=True)
        )

    def shape(self, full_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.box(full_shape))

    def spec_string(self, full_shape: Sequence[int]) -> str:
        """TensorFlow's slice spec text (``"4 0,2"`` style, ``-`` for a whole dimension)."""
        parts = ["-" if length == -1 else f"{start},{length}" for start, length in self.extents]
        return ":".join(parts)


@dataclass(frozen=True)
class TensorSpec:
    """What a checkpoint knows about one tensor without reading its data."""

    dtype: np.dtype
    shape: tuple[int, ...]
    #: The stored pieces of a partitioned variable (empty for an ordinary tensor).
    partitions: tuple[TensorSlice, ...] = ()
    #: Bytes stored for this tensor, when the format knows it cheaply.
    nbytes: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        """TensorFlow's name for the dtype (``float32``, ``bfloat16``, ``string``...)."""
        return dtype_name(self.dtype)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@runtime_checkable
class CheckpointReader(Protocol):
    """An open checkpoint. Close it with ``await reader.aclose()`` (or ``async with``).

    A reader supports ``async with`` (``__aenter__`` returns it, ``__aexit__`` closes it):
    subclass :class:`ReaderBase` to get that, a concurrent ``read_many`` and ``aclose``."""

    prefix: str

    def keys(self) -> list[str]:
        """Every tensor name, sorted (partitioned variables once, under their full name)."""
        ...

    def spec(self, key: str) -> TensorSpec: ...

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        """One tensor, or the part selected by ``index`` over its leading axes."""
        ...

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        """Several whole tensors (all when ``keys`` is None), read concurrently."""
        ...

    def files(self) -> list[str]:
        """The exact paths this checkpoint consists of."""
        ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...


class _Reads(Protocol):
    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray: ...


async def _read_each(
    reader: _Reads, pieces: Mapping[str, Index], verify: bool
) -> dict[str, np.ndarray]:
    """``read_slices``' default: one ``read`` per piece, concurrently; the first error is
    raised as itself (as ``read`` raises it), not as an exception group."""
    out: dict[str, np.ndarray] = {}

    async def one(key: str, index: Index) -> None:
        out[key] = await reader.read(key, index, verify=verify)

    await run_concurrently(partial(one, key, index) for key, index in pieces.items())
    return {key: out[key] for key in pieces}


def key_view(reader: CheckpointReader) -> Sequence[str]:
    """A reader's keys in order, as :meth:`~CheckpointReader.keys` returns them, from its
    optional ``key_view()`` where it has one (V2: names made as they are read, no list of
    them), else ``keys()``. For listings that walk every key once or twice."""
    view = getattr(reader, "key_view", None)
    if callable(view):
        keys: Sequence[str] = view()
        return keys
    return reader.keys()


class ReaderBase:
    """What a plugin's reader may inherit: ``async with`` (closing the reader on exit), a
    no-op ``aclose``, a ``read_many`` that reads the keys concurrently with ``read``, and the
    optional ``read_slices`` (part of each of several tensors) as one ``read`` per piece.
    Override ``read_many`` or ``read_slices`` to batch (``FileReader.read_ranges``),
    ``aclose`` to release."""

    prefix: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def key_view(self) -> Sequence[str]:
        """:meth:`keys` as a sequence (optional, see :func:`key_view`): override it to make
        the names as they are read, so a listing of 10^6 tensors holds no list of them."""
        return self.keys()

    async def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        raise NotImplementedError

    async def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        names = self.keys() if keys is None else list(keys)
        out: dict[str, np.ndarray] = {}

        async def one(key: str) -> None:
            out[key] = await self.read(key, verify=verify)

        async with anyio.create_task_group() as tg:
            for key in names:
                tg.start_soon(one, key)
        return {key: out[key] for key in names}

    async def read_slices(
        self, pieces: Mapping[str, Index], *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        """Part of each of several tensors (``{name: index}``, ``index`` as for ``read``; None
        for the whole tensor), as a rank restores its share after a change of world size.
        Optional (see :func:`read_slices`); this default reads each piece with ``read``,
        concurrently."""
        return await _read_each(self, pieces, verify)

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@runtime_checkable
class CheckpointFormat(Protocol):
    """A checkpoint format. Register one under the ``anyckpt.formats`` entry-point group."""

    name: str

    async def write(
        self,
        storage: Storage,
        prefix: str,
        tensors: Mapping[str, np.ndarray],
        *,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Write ``tensors`` (already normalised, see :func:`anyckpt.tensors.as_tensor`) under
        ``prefix``; return the paths written, the commit marker last. Either every file is
        written or none remains.

        The directory of ``prefix`` exists when ``write`` is called (:func:`anyckpt.save` and
        the manager create it). The arrays are the caller's and must not be modified; a buffer
        handed to a ``FileWriter`` must not change until its ``commit`` returns (a remote
        writer may send it from there)."""
        ...

    async def open(self, storage: Storage, prefix: str) -> CheckpointReader: ...

    async def detect(self, storage: Storage, prefix: str) -> bool:
        """Whether a checkpoint of this format exists at ``prefix`` (cheap: no data read)."""
        ...

    async def files(self, storage: Storage, prefix: str) -> list[str]:
        """The exact paths the checkpoint at ``prefix`` consists of (those that exist)."""
        ...

    # Optional members (``options``, ``has_checksums``, ``tf_saver_version``,
    # ``checkpoint_path``): declared with their defaults on :class:`FormatBase`.


class FormatBase:
    """What a format may inherit: the optional members of :class:`CheckpointFormat`, with
    their defaults. A format that does not inherit it gets the same defaults (anyckpt asks
    through :func:`declared_options`, :func:`has_checksums`, :func:`tf_saver_version` and
    :func:`checkpoint_path`); :func:`hook_problem` checks, at registration, that the members
    a format does declare have the right kind."""

    name: str

    #: What ``write`` accepts: {option name: :class:`FormatOption`}. None: undeclared, so
    #: nothing is checked (an empty mapping declares that ``write`` takes no option).
    options: Mapping[str, FormatOption] | None = None
    #: Whether ``read(verify=True)`` detects damaged data; ``anyckpt verify`` says so for
    #: formats that cannot.
    has_checksums: bool = False
    #: 1 or 2 for a format TensorFlow's Saver reads (V1 or V2): the manager and
    #: :func:`anyckpt.save` may then write a ``.meta`` graph. None: none.
    tf_saver_version: int | None = None

    def checkpoint_path(self, prefix: str, written: Sequence[str]) -> str:
        """The path the ``checkpoint`` state file records for a save that wrote the files
        ``written`` (a plain method, not async). V1 records a sharded save as TensorFlow's
        ``PREFIX-?????-of-0000N`` pattern; the default is ``prefix``."""
        return prefix


#: The defaults, for formats and readers that do not inherit the base classes.
_FORMAT_DEFAULTS = FormatBase()


@dataclass(frozen=True)
class FormatOption:
    """One option a format's ``write`` accepts: the types its value may have, and what it
    does. ``int`` excludes ``bool`` unless ``bool`` is listed; NumPy integers count as ints."""

    types: tuple[Any, ...]  # classes (collections.abc ones too)
    help: str = ""

    def type_names(self) -> str:
        return " or ".join(getattr(t, "__name__", str(t)) for t in self.types)

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, (bool, np.bool_)):
            return bool in self.types
        if isinstance(value, np.integer) and int in self.types:
            return True
        return isinstance(value, self.types)


# -- the optional members, for any format or reader ---------------------------------------
# (The only lookups of a hook by name: a format need not inherit FormatBase.)


def declared_options(fmt: CheckpointFormat) -> Mapping[str, FormatOption] | None:
    """The options ``fmt`` declares (None: it declares none, so none are checked)."""
    options = getattr(fmt, "options", _FORMAT_DEFAULTS.options)
    return options if isinstance(options, Mapping) else None


def has_checksums(fmt: CheckpointFormat) -> bool:
    """Whether ``fmt`` declares that reading with ``verify=True`` checks checksums."""
    return bool(getattr(fmt, "has_checksums", _FORMAT_DEFAULTS.has_checksums))


def tf_saver_version(fmt: CheckpointFormat) -> int | None:
    """The TensorFlow Saver version ``fmt`` declares (1 or 2; any other value is no Saver
    equivalent), else None."""
    version: int | None = getattr(fmt, "tf_saver_version", _FORMAT_DEFAULTS.tf_saver_version)
    return version


def checkpoint_path(fmt: CheckpointFormat, prefix: str, written: Sequence[str]) -> str:
    """The path the state file records for a save of ``fmt`` at ``prefix`` that wrote
    ``written`` (:meth:`FormatBase.checkpoint_path`; ``prefix`` by default)."""
    hook = getattr(fmt, "checkpoint_path", None)
    if hook is None:
        return _FORMAT_DEFAULTS.checkpoint_path(prefix, written)
    return str(hook(prefix, written))


async def read_slices(
    reader: CheckpointReader, pieces: Mapping[str, Index], *, verify: bool = True
) -> dict[str, np.ndarray]:
    """Part of each of several tensors of ``reader`` (``{name: index}``): its
    ``read_slices`` (:meth:`ReaderBase.read_slices`; the V2 reader batches the byte ranges),
    else one ``read`` per piece, concurrently."""
    hook = getattr(reader, "read_slices", None)
    if hook is None:
        return await _read_each(reader, pieces, verify)
    result: dict[str, np.ndarray] = await hook(pieces, verify=verify)
    return result


def hook_problem(fmt: Any) -> str | None:
    """Why the optional members ``fmt`` declares do not fit (None when they do, or when it
    declares none): ``checkpoint_path`` a plain method, ``has_checksums`` a bool,
    ``tf_saver_version`` None, 1 or 2, ``options`` None or a mapping of
    :class:`FormatOption`."""
    method = getattr(fmt, "checkpoint_path", None)
    if method is not None and (not callable(method) or inspect.iscoroutinefunction(method)):
        return "'checkpoint_path' must be a plain (not async) method"
    if not isinstance(getattr(fmt, "has_checksums", False), (bool, np.bool_)):
        return "'has_checksums' must be a bool"
    version = getattr(fmt, "tf_saver_version", None)
    if version is not None and (isinstance(version, bool) or version not in (1, 2)):
        return f"'tf_saver_version' must be None, 1 or 2, not {version!r}"
    options = getattr(fmt, "options", None)
    if options is not None and (
        not isinstance(options, Mapping)
        or not all(isinstance(v, FormatOption) for v in options.values())
    ):
        return "'options' must be None or a mapping of option names to FormatOption"
    return None


def check_options(fmt: CheckpointFormat, options: Mapping[str, Any] | None) -> None:
    """Refuse options ``fmt`` does not declare, or of a declared wrong type
    (:class:`~anyckpt.errors.InvalidOptionError`, naming the valid ones)."""
    declared = declared_options(fmt)
    if declared is None or not options:
        return
    valid = ", ".join(f"{k} ({v.type_names()})" for k, v in declared.items()) or "none"
    for key, value in options.items():
        spec = declared.get(key)
        if spec is None:
            raise InvalidOptionError(
                f"unknown option {key!r} for format {fmt.name!r} (valid options: {valid})"
            )
        if not spec.accepts(value):
            raise InvalidOptionError(
                f"option {key!r} of format {fmt.name!r} must be {spec.type_names()}, "
                f"not {type(value).__name__} {value!r} (valid options: {valid})"
            )

"""Blocking twins of the async API, for ordinary synchronous code.

Each call runs the async implementation on an event loop in a background thread (an anyio
blocking portal), so it also works when the calling thread has an event loop of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from types import TracebackType
from typing import Any

import numpy as np
from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import api
from .formats.base import CheckpointReader, Index, TensorSpec


def save(prefix: api.PathLike, tensors: Mapping[Any, Any], **kwargs: Any) -> list[str]:
    """Blocking :func:`anyckpt.save`."""
    with start_blocking_portal() as portal:
        return portal.call(partial(api.save, prefix, tensors, **kwargs))


def load(
    prefix: api.PathLike, keys: Sequence[str] | None = None, **kwargs: Any
) -> dict[str, np.ndarray]:
    """Blocking :func:`anyckpt.load`."""
    with start_blocking_portal() as portal:
        return portal.call(partial(api.load, prefix, keys, **kwargs))


class Reader:
    """A blocking view of a :class:`~anyckpt.formats.base.CheckpointReader`."""

    def __init__(self, reader: CheckpointReader, portal: BlockingPortal) -> None:
        self._reader = reader
        self._portal = portal
        self.prefix = reader.prefix

    def keys(self) -> list[str]:
        return self._reader.keys()

    def spec(self, key: str) -> TensorSpec:
        return self._reader.spec(key)

    def files(self) -> list[str]:
        return self._reader.files()

    def read(self, key: str, index: Index = None, *, verify: bool = True) -> np.ndarray:
        return self._portal.call(partial(self._reader.read, key, index, verify=verify))

    def read_many(
        self, keys: Sequence[str] | None = None, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        return self._portal.call(partial(self._reader.read_many, keys, verify=verify))


class open:
    """``with anyckpt.sync.open(prefix) as reader:`` — blocking :func:`anyckpt.open`."""

    def __init__(self, prefix: api.PathLike, **kwargs: Any) -> None:
        self._args = (prefix, kwargs)
        self._stack = ExitStack()

    def __enter__(self) -> Reader:
        prefix, kwargs = self._args
        portal = self._stack.enter_context(start_blocking_portal())
        try:
            reader = portal.call(partial(api.open_reader, prefix, **kwargs))
        except BaseException:
            self._stack.close()
            raise
        self._stack.callback(portal.call, reader.aclose)
        return Reader(reader, portal)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

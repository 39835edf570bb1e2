"""Save, load and open one checkpoint prefix: `anyckpt.save`, `anyckpt.load`, `anyckpt.open`."""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from .formats import detect_format, get_format
from .formats.base import CheckpointReader
from .storage import Storage
from .tensors import prepare

PathLike = str | os.PathLike[str]


async def save(
    prefix: PathLike,
    tensors: Mapping[Any, Any],
    *,
    format: str = "v2",
    storage_options: dict[str, Any] | None = None,
    durable: bool = True,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``tensors`` as one checkpoint at ``prefix``; return the files written.

    ``prefix`` is a local path or an fsspec URL (``memory://``, ``s3://``...); for the V2
    format the files are ``PREFIX.index`` and ``PREFIX.data-00000-of-00001``. Nested mappings
    are flattened to ``a/b/c`` names. ``durable=False`` skips ``fsync`` (page cache only).
    """
    storage, path = Storage.from_url(prefix, storage_options)
    return await get_format(format).write(
        storage, path, prepare(tensors), durable=durable, options=options
    )


async def load(
    prefix: PathLike,
    keys: Sequence[str] | None = None,
    *,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Read the tensors at ``prefix`` (all, or ``keys``); the format is detected.

    Checksums are verified unless ``verify=False``. String tensors come back as object arrays
    of ``bytes``; bfloat16 as ``ml_dtypes.bfloat16``.
    """
    async with open(prefix, storage_options=storage_options) as reader:
        return await reader.read_many(keys, verify=verify)


async def open_reader(
    prefix: PathLike, *, format: str | None = None, storage_options: dict[str, Any] | None = None
) -> CheckpointReader:
    """Open the checkpoint at ``prefix``; close it with ``await reader.aclose()``."""
    storage, path = Storage.from_url(prefix, storage_options)
    fmt = get_format(format) if format else await detect_format(storage, path)
    return await fmt.open(storage, path)


class open:
    """``async with anyckpt.open(prefix) as reader:`` (or ``reader = await anyckpt.open(...)``)."""

    def __init__(
        self,
        prefix: PathLike,
        *,
        format: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self._args = (prefix, format, storage_options)
        self._reader: CheckpointReader | None = None

    async def _open(self) -> CheckpointReader:
        prefix, fmt, options = self._args
        return await open_reader(prefix, format=fmt, storage_options=options)

    def __await__(self) -> Generator[Any, None, CheckpointReader]:
        return self._open().__await__()

    async def __aenter__(self) -> CheckpointReader:
        self._reader = await self._open()
        return self._reader

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            await self._reader.aclose()

"""Save, load and open one checkpoint prefix: `anyckpt.save`, `anyckpt.load`, `anyckpt.open`;
read and write TensorFlow's ``PREFIX.meta`` graph (`anyckpt.read_meta_graph`)."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from .codecs import DecodeError
from .errors import CorruptCheckpointError
from .formats import detect_format, get_format
from .formats.base import CheckpointFormat, CheckpointReader
from .meta import MAX_META_BYTES, MetaGraphInfo, SaverConfig, decode_meta_graph, encode_meta_graph
from .storage import Storage
from .tensors import key_to_bytes, prepare

PathLike = str | os.PathLike[str]


async def save(
    prefix: PathLike,
    tensors: Mapping[Any, Any],
    *,
    format: str = "v2",
    storage_options: dict[str, Any] | None = None,
    durable: bool = True,
    options: Mapping[str, Any] | None = None,
    write_meta_graph: bool = False,
) -> list[str]:
    """Write ``tensors`` as one checkpoint at ``prefix``; return the files written.

    ``prefix`` is a local path or an fsspec URL (``memory://``, ``s3://``...); for the V2
    format the files are ``PREFIX.index`` and ``PREFIX.data-00000-of-00001``. Nested mappings
    are flattened to ``a/b/c`` names. ``durable=False`` skips ``fsync`` (page cache only).
    ``write_meta_graph=True`` also writes ``PREFIX.meta`` (first, so it exists once the
    checkpoint is complete) for ``tf.compat.v1.train.import_meta_graph``; see docs/meta-graph.md.
    """
    storage, path = Storage.from_url(prefix, storage_options)
    fmt = get_format(format)
    prepared = prepare(tensors)
    if not write_meta_graph:
        return await fmt.write(storage, path, prepared, durable=durable, options=options)
    meta = await write_meta_file(storage, path, fmt, prepared, options, durable=durable)
    try:
        files = await fmt.write(storage, path, prepared, durable=durable, options=options)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(storage.remove, meta)
        raise
    return [*files, meta]


async def load(
    prefix: PathLike,
    keys: Sequence[str] | None = None,
    *,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    allow_symlinks: bool = False,
) -> dict[str, np.ndarray]:
    """Read the tensors at ``prefix`` (all, or ``keys``); the format is detected.

    Checksums are verified unless ``verify=False``. String tensors come back as object arrays
    of ``bytes``; bfloat16 as ``ml_dtypes.bfloat16``. A file that is a symbolic link leaving
    the checkpoint's directory raises :class:`~anyckpt.UnsafePathError` unless
    ``allow_symlinks=True`` (docs/reliability.md).
    """
    async with open(
        prefix, storage_options=storage_options, allow_symlinks=allow_symlinks
    ) as reader:
        return await reader.read_many(keys, verify=verify)


async def open_reader(
    prefix: PathLike,
    *,
    format: str | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_symlinks: bool = False,
) -> CheckpointReader:
    """Open the checkpoint at ``prefix``; close it with ``await reader.aclose()``. Symbolic
    links leaving the checkpoint's directory are refused unless ``allow_symlinks=True``."""
    storage, path = Storage.from_url(prefix, storage_options, allow_symlinks=allow_symlinks)
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
        allow_symlinks: bool = False,
    ) -> None:
        self._args = (prefix, format, storage_options, allow_symlinks)
        self._reader: CheckpointReader | None = None

    async def _open(self) -> CheckpointReader:
        prefix, fmt, options, links = self._args
        return await open_reader(prefix, format=fmt, storage_options=options, allow_symlinks=links)

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


# -- PREFIX.meta: TensorFlow's MetaGraphDef --------------------------------------------------


def meta_path(prefix: str) -> str:
    """The ``.meta`` file of a checkpoint prefix (of a V1 sharded pattern
    ``PREFIX-?????-of-N`` too: ``PREFIX.meta``, as TensorFlow names it)."""
    if re.fullmatch(r".*-\?{5}-of-\d{5}", prefix):
        prefix = prefix.rsplit("-", 3)[0]
    return prefix + ".meta"


def _shard_groups(
    tensors: Mapping[str, np.ndarray], options: Mapping[str, Any] | None
) -> list[list[str]] | None:
    """The key groups the formats' shard planner makes of ``tensors`` (None: unsharded)."""
    from .formats.sharded import ShardOptions, plan_shards, tensor_nbytes

    opts = ShardOptions.from_options(options)
    if not opts.sharded:
        return None
    names = sorted(tensors, key=key_to_bytes)
    sizes = [(k, tensor_nbytes(tensors[k]) if opts.needs_sizes else 0) for k in names]
    return plan_shards(sizes, opts)


async def write_meta_file(
    storage: Storage,
    prefix: str,
    format: CheckpointFormat | str,
    tensors: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    *,
    durable: bool = True,
    max_to_keep: int | None = 5,
    keep_checkpoint_every_n_hours: float | None = None,
) -> str:
    """Write ``PREFIX.meta`` for ``tensors`` (arrays or specs) saved in ``format`` with the
    write ``options`` (its sharding) by a saver with this retention; return its path."""
    shards = _shard_groups(tensors, options) if options else None
    saver = SaverConfig.for_format(
        format,
        max_to_keep=max_to_keep,
        keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
        sharded=shards is not None,
    )
    data = await anyio.to_thread.run_sync(lambda: encode_meta_graph(tensors, saver, shards=shards))
    path = meta_path(prefix)
    directory = posixpath.dirname(path)
    if directory:
        await anyio.to_thread.run_sync(storage.makedirs, directory)
    await anyio.to_thread.run_sync(lambda: storage.write_bytes(path, data, durable=durable))
    return path


async def export_meta_graph(
    prefix: PathLike,
    *,
    max_to_keep: int | None = 5,
    keep_checkpoint_every_n_hours: float | None = None,
    storage_options: dict[str, Any] | None = None,
    durable: bool = True,
) -> str:
    """Write ``PREFIX.meta`` for an existing checkpoint (its format is detected); return its
    path. The graph restores every tensor, partitioned ones slice by slice; its save graph is
    unsharded whatever the checkpoint's shards (TensorFlow restores either way)."""
    storage, path = Storage.from_url(prefix, storage_options)
    fmt = await detect_format(storage, path)
    reader = await fmt.open(storage, path)
    try:
        keys = reader.keys()
        specs = {key: reader.spec(key) for key in keys}
    finally:
        await reader.aclose()
    return await write_meta_file(
        storage,
        path,
        fmt,
        specs,
        durable=durable,
        max_to_keep=max_to_keep,
        keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
    )


async def read_meta_graph(
    path: PathLike, *, storage_options: dict[str, Any] | None = None
) -> MetaGraphInfo:
    """Parse a ``.meta`` file (``path`` ends in ``.meta``, or is the checkpoint prefix): its
    variables (name, dtype, shape, and the checkpoint key each is restored from), saver_def
    and collections. Damaged or foreign bytes raise :class:`~anyckpt.CorruptCheckpointError`."""
    storage, where = Storage.from_url(path, storage_options)
    return await read_meta_file(storage, where if where.endswith(".meta") else meta_path(where))


async def read_meta_file(storage: Storage, path: str) -> MetaGraphInfo:
    """:func:`read_meta_graph` of one ``.meta`` file of ``storage``."""
    data = await anyio.to_thread.run_sync(lambda: storage.read_bytes(path, max_size=MAX_META_BYTES))
    try:
        return await anyio.to_thread.run_sync(decode_meta_graph, data)
    except DecodeError as exc:
        raise CorruptCheckpointError(
            f"not a TensorFlow meta graph: {exc}", path=storage.url(path)
        ) from None

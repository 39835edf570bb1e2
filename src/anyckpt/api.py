"""Save, load and open one checkpoint prefix: `anyckpt.save`, `anyckpt.load`, `anyckpt.open`;
read and write TensorFlow's ``PREFIX.meta`` graph (`anyckpt.read_meta_graph`)."""

from __future__ import annotations

import importlib
import os
import posixpath
from collections.abc import Generator, Mapping, Sequence
from contextlib import suppress
from functools import partial
from types import TracebackType
from typing import Any, Literal, overload

import anyio
import anyio.to_thread
import numpy as np

from ._concurrency import run_in_worker
from .codecs import DecodeError
from .errors import CorruptCheckpointError
from .formats import get_format, locate_checkpoint
from .formats.base import CheckpointFormat, CheckpointReader, check_options
from .formats.layout import META, meta_path, parse_file_name
from .formats.v2 import probe_prefix
from .formats.v2_reader import NOW_KEYS, V2Reader
from .meta import MAX_META_BYTES, MetaGraphInfo, SaverConfig, decode_meta_graph, encode_meta_graph
from .object_graph import (
    OBJECT_GRAPH_KEY,
    Layout,
    ObjectTree,
    build_tree,
    decode_tree_layout,
    encode_tree,
    graph_value,
)
from .storage import Storage
from .tensors import key_to_bytes, prepare


def _import_asyncio_backend() -> None:
    """Import anyio's asyncio backend now, with anyckpt's modules (which a trainer imports
    before its loop runs), not on its first use, which is on the event loop (~20 ms of the
    loop's first manager). Trio's backend is imported on its first use, as before."""
    with suppress(ImportError):
        importlib.import_module("anyio._backends._asyncio")


_import_asyncio_backend()

PathLike = str | os.PathLike[str]


async def open_storage(
    url: PathLike, storage_options: dict[str, Any] | None = None, *, allow_symlinks: bool = False
) -> tuple[Storage, str]:
    """:meth:`Storage.from_url` in a worker thread: the first use of a protocol imports its
    filesystem (s3fs and aiobotocore: ~0.2 s), which must not stall the event loop."""
    return await anyio.to_thread.run_sync(
        partial(Storage.from_url, url, storage_options, allow_symlinks=allow_symlinks)
    )


async def save(
    prefix: PathLike,
    tensors: Mapping[Any, Any],
    *,
    format: str = "v2",
    storage_options: dict[str, Any] | None = None,
    durable: bool = True,
    options: Mapping[str, Any] | None = None,
    write_meta_graph: bool = False,
    object_graph: bool = False,
) -> list[str]:
    """Write ``tensors`` as one checkpoint at ``prefix``; return the files written.

    ``prefix`` is a local path or an fsspec URL (``memory://``, ``s3://``...); for the V2
    format the files are ``PREFIX.index`` and ``PREFIX.data-00000-of-00001``. Nested mappings
    are flattened to ``a/b/c`` names. ``durable=False`` skips ``fsync`` (page cache only).
    ``write_meta_graph=True`` also writes ``PREFIX.meta`` (first, so it exists once the
    checkpoint is complete) for ``tf.compat.v1.train.import_meta_graph``; see docs/meta-graph.md.
    ``object_graph=True`` writes ``tensors`` as a TF2 object tree (see `anyckpt.object_graph`)
    with its ``_CHECKPOINTABLE_OBJECT_GRAPH``, for ``tf.train.Checkpoint.restore``.
    """
    fmt = get_format(format)
    check_options(fmt, options)
    if object_graph:
        tensors = with_object_graph(tensors)
        options = {"data_order": "given", **(options or {})}
    storage, path = await open_storage(prefix, storage_options)
    prepared = prepare(tensors, share=True)  # the caller's own dict if flat and plain: not kept
    directory = posixpath.dirname(path)
    if directory:  # formats may rely on it (docs/plugins.md)
        await anyio.to_thread.run_sync(storage.makedirs, directory)
    if not write_meta_graph:
        files = await fmt.write(storage, path, prepared, durable=durable, options=options)
        return _as_given(storage, path, prefix, files)
    meta = await write_meta_file(storage, path, fmt, prepared, options, durable=durable)
    try:
        files = await fmt.write(storage, path, prepared, durable=durable, options=options)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(storage.remove, meta)
        raise
    return _as_given(storage, path, prefix, [*files, meta])


def _as_given(storage: Storage, path: str, prefix: PathLike, files: list[str]) -> list[str]:
    """The files' paths as the caller wrote the prefix: a URL keeps its scheme and spelling
    (``s3://bucket/x/ckpt-1.index``, not ``bucket/x/ckpt-1.index``); local paths are
    absolute."""
    if storage.plain_paths:
        return files
    given = os.fspath(prefix).rstrip("/")
    return [given + f[len(path) :] if f.startswith(path) else storage.url(f) for f in files]


def with_object_graph(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The flat tensors of a TF2 object tree, ``_CHECKPOINTABLE_OBJECT_GRAPH`` included."""
    values, graph = encode_tree(tree)
    if OBJECT_GRAPH_KEY in values:
        raise ValueError(f"{OBJECT_GRAPH_KEY} is reserved for the object graph")
    blob = np.empty((), dtype=object)
    blob[()] = graph
    return {**values, OBJECT_GRAPH_KEY: blob}


@overload
async def load(
    prefix: PathLike,
    keys: Sequence[str] | None = None,
    *,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    layout: Literal["flat"] = "flat",
    allow_symlinks: bool = False,
) -> dict[str, np.ndarray]: ...


@overload
async def load(
    prefix: PathLike,
    keys: Sequence[str] | None = None,
    *,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    layout: Literal["tree"],
    allow_symlinks: bool = False,
) -> ObjectTree: ...


async def load(
    prefix: PathLike,
    keys: Sequence[str] | None = None,
    *,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    layout: Literal["flat", "tree"] = "flat",
    allow_symlinks: bool = False,
) -> dict[str, np.ndarray] | ObjectTree:
    """Read the tensors at ``prefix`` (all, or ``keys``); the format is detected.

    Checksums are verified unless ``verify=False``. String tensors come back as object arrays
    of ``bytes``; bfloat16 as ``ml_dtypes.bfloat16``. ``layout="tree"`` reads a TF2
    object-based checkpoint along its object graph (:func:`read_tree`; no ``keys``). A
    file that is a symbolic link leaving the checkpoint's directory raises
    :class:`~anyckpt.UnsafePathError` unless ``allow_symlinks=True`` (docs/reliability.md).
    """
    if layout == "tree":
        if keys is not None:
            raise ValueError("layout='tree' reads the whole object graph: pass no keys")
        return await read_tree(prefix, verify=verify, storage_options=storage_options)
    if layout != "flat":
        raise ValueError(f"layout must be 'flat' or 'tree', not {layout!r}")
    if keys is not None and len(keys) <= NOW_KEYS:
        # A few keys of a V2 checkpoint on a local disk: found, opened, looked up and read
        # in one worker hop (half of what restoring a few small tensors took beyond the read).
        names = list(keys)
        few = await run_in_worker(
            partial(read_few_now, prefix, names, verify, storage_options, allow_symlinks)
        )
        return few.result if few.result is not None else await few.read_rest()
    async with open(
        prefix, storage_options=storage_options, allow_symlinks=allow_symlinks
    ) as reader:
        return await reader.read_many(keys, verify=verify)


class FewKeys:
    """What :func:`read_few_now` did: the tensors read, or the checkpoint found and opened for
    :meth:`read_rest` to read them (not local, not small, or not V2)."""

    def __init__(
        self,
        storage: Storage,
        path: str,
        keys: list[str],
        verify: bool,
        reader: V2Reader | None,
        result: dict[str, np.ndarray] | None,
    ) -> None:
        self.storage, self.path, self.keys, self.verify = storage, path, keys, verify
        self.reader = reader
        self.result = result

    async def read_rest(self) -> dict[str, np.ndarray]:
        """Read the keys through the general path, from where :func:`read_few_now` stopped."""
        if self.reader is not None:  # a V2 reader, the keys already looked up
            return await self.reader.read_found(self.keys, self.verify)
        reader = await _open_located(self.storage, self.path)
        try:
            return await reader.read_many(self.keys, verify=self.verify)
        finally:
            await reader.aclose()


def read_few_now(
    url: PathLike,
    keys: list[str],
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    allow_symlinks: bool = False,
) -> FewKeys:
    """Blocking (a worker thread, or blocking code): find the checkpoint at ``url`` and, for a
    V2 prefix, open it and read ``keys`` now when that is a small read from a local disk
    (:meth:`V2Reader.read_small_now`). ``load(prefix, keys)`` runs it in one worker hop;
    ``anyckpt.sync.load`` on the calling thread, with no event loop at all."""
    storage, path, index = _storage_and_v2_index(
        url, storage_options, allow_symlinks=allow_symlinks
    )
    if index is None:
        return FewKeys(storage, path, keys, verify, None, None)
    reader = V2Reader.from_index(storage, path, index)
    return FewKeys(storage, path, keys, verify, reader, reader.read_small_now(keys, verify))


async def read_layout(
    prefix: PathLike, *, storage_options: dict[str, Any] | None = None
) -> tuple[Layout, bytes, list[str]]:
    """The validated object graph of a TF2 checkpoint: (layout, graph bytes, all keys)."""
    async with open(prefix, storage_options=storage_options) as reader:
        keys = reader.keys()
        if OBJECT_GRAPH_KEY not in keys:
            raise CorruptCheckpointError(
                f"no {OBJECT_GRAPH_KEY}: not a TF2 object-based checkpoint", path=str(prefix)
            )
        data = graph_value(await reader.read(OBJECT_GRAPH_KEY))
    try:
        layout = decode_tree_layout(data, set(keys))
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(str(e), path=str(prefix)) from None
    return layout, data, keys


async def read_tree(
    prefix: PathLike, *, verify: bool = True, storage_options: dict[str, Any] | None = None
) -> ObjectTree:
    """Read a TF2 checkpoint as an :class:`~anyckpt.object_graph.ObjectTree`.

    Raises :class:`~anyckpt.errors.CorruptCheckpointError` if it has no object graph or the
    graph is malformed (ids out of range, attributes naming absent keys, slots that are not
    variables, too many nodes...).
    """
    layout, data, keys = await read_layout(prefix, storage_options=storage_options)
    wanted = layout.checkpoint_keys()
    async with open(prefix, storage_options=storage_options) as reader:
        values = await reader.read_many(wanted, verify=verify)
    named = set(wanted) | {OBJECT_GRAPH_KEY}
    unattached = [k for k in keys if k not in named]
    return build_tree(layout, values, unattached=unattached, graph=data)


async def open_reader(
    prefix: PathLike,
    *,
    format: str | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_symlinks: bool = False,
) -> CheckpointReader:
    """Open the checkpoint at ``prefix`` (or the one whose file ``prefix`` names, e.g.
    ``DIR/ckpt-5.index``); close it with ``await reader.aclose()``. Symbolic links leaving the
    checkpoint's directory are refused unless ``allow_symlinks=True``."""
    if format:
        storage, path = await open_storage(prefix, storage_options, allow_symlinks=allow_symlinks)
        return await get_format(format).open(storage, path)
    storage, path, index = await run_in_worker(
        partial(_storage_and_v2_index, prefix, storage_options, allow_symlinks=allow_symlinks)
    )
    if index is not None:  # the common case, a V2 prefix: found and read in one hop
        return V2Reader.from_index(storage, path, index)
    return await _open_located(storage, path)


async def _open_located(storage: Storage, path: str) -> CheckpointReader:
    """The checkpoint at ``path`` (a prefix or one of its files), its format detected."""
    path, fmt = await locate_checkpoint(storage, path)
    return await fmt.open(storage, path)


def _storage_and_v2_index(
    url: PathLike, storage_options: dict[str, Any] | None, *, allow_symlinks: bool
) -> tuple[Storage, str, bytes | None]:
    """Blocking: :meth:`Storage.from_url` and, when ``url`` is a V2 checkpoint's prefix, its
    index (:func:`~anyckpt.formats.v2.probe_prefix`). Opening a prefix costs one
    worker-thread hop instead of four, which is most of the time a restore of a few small
    tensors takes beyond reading them."""
    storage, path = Storage.from_url(url, storage_options, allow_symlinks=allow_symlinks)
    return storage, path, probe_prefix(storage, path)


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
    storage, path = await open_storage(prefix, storage_options)
    path, fmt = await locate_checkpoint(storage, path)
    reader = await fmt.open(storage, path)
    try:
        keys = reader.keys()
        specs = {key: reader.spec(key) for key in keys}
    finally:
        await reader.aclose()
    meta = await write_meta_file(
        storage,
        path,
        fmt,
        specs,
        durable=durable,
        max_to_keep=max_to_keep,
        keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
    )
    return _as_given(storage, path, prefix, [meta])[0]


async def read_meta_graph(
    path: PathLike, *, storage_options: dict[str, Any] | None = None
) -> MetaGraphInfo:
    """Parse a ``.meta`` file (``path`` ends in ``.meta``, or is the checkpoint prefix): its
    variables (name, dtype, shape, and the checkpoint key each is restored from), saver_def
    and collections. Damaged or foreign bytes raise :class:`~anyckpt.CorruptCheckpointError`."""
    storage, where = await open_storage(path, storage_options)
    parsed = parse_file_name(posixpath.basename(where))
    is_meta = parsed is not None and parsed.role == META
    return await read_meta_file(storage, where if is_meta else meta_path(where))


async def read_meta_file(storage: Storage, path: str) -> MetaGraphInfo:
    """:func:`read_meta_graph` of one ``.meta`` file of ``storage``."""
    data = await anyio.to_thread.run_sync(lambda: storage.read_bytes(path, max_size=MAX_META_BYTES))
    try:
        return await anyio.to_thread.run_sync(decode_meta_graph, data)
    except DecodeError as exc:
        raise CorruptCheckpointError(
            f"not a TensorFlow meta graph: {exc}", path=storage.url(path)
        ) from None

"""From what a user names to a checkpoint: a prefix, or any one of a checkpoint's files.

``DIR/ckpt-5``, ``DIR/ckpt-5.index``, ``DIR/ckpt-5.data-00000-of-00001``, ``DIR/ckpt-5.meta``,
one shard ``DIR/model-00001-of-00002`` of a sharded V1 checkpoint and a plugin's own file
(``x.safetensors``) all resolve to the same checkpoint. A file that is no checkpoint's (a text
file, the ``checkpoint`` state file, a ``.meta`` or a data file without its checkpoint) raises an
error saying what the file is and what was expected. :func:`anyckpt.open`, :func:`anyckpt.load`
and every CLI command resolve through :func:`resolve_checkpoint`.
"""

from __future__ import annotations

import posixpath

import anyio.to_thread

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..storage import Storage
from . import layout
from .base import CheckpointFormat
from .layout import STATE_FILE, file_name, meta_path, parse_file_name, shard_of

__all__ = ["EXPECTED", "path_kind", "resolve_checkpoint"]

#: What a user may name, for error messages.
EXPECTED = (
    "expected a checkpoint prefix (DIR/ckpt-5), one of its files (DIR/ckpt-5.index) "
    "or a checkpoint directory"
)


def path_kind(storage: Storage, path: str) -> str:
    """``"file"``, ``"dir"`` or ``"none"``."""
    return storage.path_kind(path)


def _candidates(path: str) -> list[str]:
    """Prefixes a file named ``path`` may belong to, most specific first."""
    found: list[str] = []
    directory, base = posixpath.split(path)
    parsed = parse_file_name(base)
    if parsed is not None and parsed.role in (layout.INDEX, layout.DATA):
        found.append(posixpath.join(directory, parsed.stem))
    shard = shard_of(base) if parsed is not None and parsed.role == layout.V1_SHARD else None
    if parsed is not None and shard is not None:
        pattern = file_name(parsed.stem, layout.V1_PATTERN, num_shards=shard[1])
        found.append(posixpath.join(directory, pattern))
    if "." in base.lstrip("."):
        found.append(posixpath.join(directory, base.rsplit(".", 1)[0]))
    return list(dict.fromkeys(found))


async def _owner(
    formats: list[CheckpointFormat], storage: Storage, path: str
) -> tuple[str, CheckpointFormat] | None:
    """The checkpoint (prefix, format) that lists ``path`` among its files (or whose
    ``PREFIX.meta`` it is), if any."""
    for prefix in _candidates(path):
        meta = path == meta_path(prefix)
        for fmt in formats:
            try:
                if not await fmt.detect(storage, prefix):
                    continue
                if meta or path in await fmt.files(storage, prefix):
                    return prefix, fmt
            except CheckpointError:
                continue
    return None


async def _claimed_but_broken(
    formats: list[CheckpointFormat], storage: Storage, path: str
) -> tuple[str, CheckpointFormat] | None:
    """A format that names ``path`` as one of its files, though it detects no checkpoint."""
    for prefix in _candidates(path):
        for fmt in formats:
            try:
                if path in await fmt.files(storage, prefix):
                    return prefix, fmt
            except (CheckpointError, OSError):  # noqa: PERF203 - a few candidates
                continue
    return None


async def resolve_checkpoint(
    storage: Storage, path: str, formats: list[CheckpointFormat]
) -> tuple[str, CheckpointFormat] | None:
    """The (prefix, format) of the checkpoint ``path`` names, trying ``formats`` in order.

    None when nothing exists at ``path`` as a file or prefix, or ``path`` is a directory
    (the caller decides what a directory means). A file that belongs to no checkpoint raises
    :class:`CheckpointNotFoundError` (or :class:`CorruptCheckpointError` when a format claims
    it by name but cannot read it) saying what the file is."""
    url = storage.url(path)
    kind = await anyio.to_thread.run_sync(path_kind, storage, path)
    if kind == "dir":
        return None
    if kind == "file":
        owner = await _owner(formats, storage, path)
        if owner is not None:
            return owner
    for fmt in formats:
        if await fmt.detect(storage, path):
            return path, fmt
    if kind != "file":
        return None
    # An existing file no format reads: say what it is.
    base = posixpath.basename(path)
    if base == STATE_FILE:
        raise CheckpointNotFoundError(
            "this is a directory's state file (it names checkpoints), not a checkpoint; "
            "give its directory to use the latest checkpoint",
            path=url,
        )
    parsed = parse_file_name(base)
    if parsed is not None and parsed.role == layout.META:
        prefix = posixpath.join(posixpath.dirname(path), parsed.stem)
        raise CheckpointNotFoundError(
            f"this is a TensorFlow meta graph (.meta), and its checkpoint "
            f"{storage.url(prefix)} does not exist; {EXPECTED}",
            path=url,
        )
    claimed = await _claimed_but_broken(formats, storage, path)
    if claimed is not None:
        prefix, fmt = claimed
        try:
            reader = await fmt.open(storage, prefix)
        except CheckpointNotFoundError as exc:
            missing = exc.path or storage.url(prefix)
            raise CheckpointNotFoundError(
                f"a file of a {fmt.name} checkpoint, but its checkpoint is incomplete: "
                f"{missing} is missing",
                path=url,
            ) from None
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(
                f"named like a {fmt.name} checkpoint file, but it is not one: {exc}"
            ) from None
        await reader.aclose()
        return prefix, fmt
    raise CheckpointNotFoundError(
        f"not a checkpoint file: no format ({', '.join(f.name for f in formats)}) "
        f"recognises it; {EXPECTED}",
        path=url,
    )

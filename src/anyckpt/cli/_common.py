"""What every command shares: the run context, option parsing, finding a checkpoint (and the
exit codes, from :mod:`._exit`)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import posixpath
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import anyio.to_thread

from ..codecs.state_file import CheckpointState, relativize
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..formats import locate_checkpoint
from ..formats.base import CheckpointFormat, TensorSpec
from ..formats.resolve import path_kind
from ..manager import STATE_FILE, read_state
from ..storage import Storage
from ._exit import CliError as CliError
from ._exit import ExitCode as ExitCode
from ._output import Progress, plural, stream_is_terminal


@dataclass
class Context:
    """Options common to every command, and the output streams."""

    json: bool = False
    debug: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    allow_symlinks: bool = False
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    err: IO[str] = field(default_factory=lambda: sys.stderr)

    def echo(self, text: str = "") -> None:
        """A line of human output (suppressed under ``--json``)."""
        if not self.json:
            print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        print(f"anyckpt: warning: {text}", file=self.err, flush=True)

    def progress_bar(self, label: str, total: int | None, *, unit: str = "bytes") -> Progress:
        """A progress bar, drawn only on a terminal (stderr) and never under ``--no-progress``."""
        enabled = self.progress and stream_is_terminal(self.err)
        return Progress(label, total, enabled=enabled, stream=self.err, unit=unit)

    def storage(self, url: str) -> tuple[Storage, str]:
        return Storage.from_url(url, self.storage_options, allow_symlinks=self.allow_symlinks)


def parse_key_values(items: Iterable[str], what: str) -> dict[str, Any]:
    """``["anon=true", "client_kwargs={\\"region_name\\": \\"x\\"}"]`` -> a dict. A value that
    parses as JSON (numbers, true/false/null, objects, lists) is used as such; anything else
    is a string."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {item!r} is not KEY=VALUE", ExitCode.USAGE)
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        result[key] = value
    return result


@dataclass
class Checkpoint:
    """One checkpoint the user named: where it is and its format."""

    storage: Storage
    path: str
    format: CheckpointFormat

    @property
    def url(self) -> str:
        return self.storage.url(self.path)


async def find_checkpoint(ctx: Context, target: str) -> Checkpoint:
    """The checkpoint ``target`` names: a prefix (``DIR/ckpt-5``), one of its files
    (``DIR/ckpt-5.index``, one V1 shard...; :func:`anyckpt.formats.locate_checkpoint`), or a
    directory (its latest checkpoint, from the state file)."""
    storage, path = ctx.storage(target)
    if await anyio.to_thread.run_sync(path_kind, storage, path) != "dir":
        prefix, fmt = await locate_checkpoint(storage, path)
        return Checkpoint(storage, prefix, fmt)
    state = await read_state_or_explain(storage, path)
    if state is not None and state.model_checkpoint_path:
        name = relativize(state.model_checkpoint_path, path)
        prefix = posixpath.join(path, name)
        try:
            prefix, fmt = await locate_checkpoint(storage, prefix)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"the state file names {name!r} as the latest checkpoint, but it does not exist",
                path=storage.url(path),
            ) from None
        return Checkpoint(storage, prefix, fmt)
    raise CheckpointNotFoundError(
        "a directory without a 'checkpoint' state file naming its latest checkpoint; give a "
        "checkpoint prefix such as DIR/ckpt-5 ('anyckpt ls DIR' lists them)",
        path=storage.url(path),
    )


async def read_state_or_explain(storage: Storage, directory: str) -> CheckpointState | None:
    """The directory's state file (None if it has none); an unreadable one raises
    :class:`CorruptCheckpointError` saying so and why."""
    try:
        return await read_state(storage, directory)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(
            f"unreadable state file: {state_error_text(exc)}",
            path=storage.url(posixpath.join(directory, STATE_FILE)),
        ) from None
    except OSError as exc:
        raise CorruptCheckpointError(
            f"unreadable state file: {exc.strerror or exc}",
            path=storage.url(posixpath.join(directory, STATE_FILE)),
        ) from None


def state_error_text(exc: CorruptCheckpointError) -> str:
    """The reason a state file is unreadable, without the path prefix."""
    text = str(exc)
    if exc.path and text.startswith(f"{exc.path}: "):
        text = text[len(exc.path) + 2 :]
    return text


def tensor_nbytes(spec: TensorSpec) -> int:
    """A tensor's data size: elements x item size (strings: their stored bytes when the format
    knows them, else one byte each). Compressed formats store less (:func:`stored_nbytes`)."""
    if spec.dtype.kind != "O":
        return spec.size * spec.dtype.itemsize
    raw = spec.extra.get("raw_bytes")
    if isinstance(raw, int):
        return raw
    return spec.nbytes if spec.nbytes is not None else spec.size


def stored_nbytes(spec: TensorSpec) -> int | None:
    """Bytes the format stores for a tensor (None when it does not say)."""
    return spec.nbytes


def file_sizes(storage: Storage, paths: list[str]) -> list[int | None]:
    """The size of each file (None when it is missing or cannot be asked), from metadata
    only: no file is opened, so unreadable files still have a size."""
    sizes: list[int | None] = []
    for path in paths:
        try:
            sizes.append(storage.size(path))
        except (OSError, ValueError, TypeError):  # noqa: PERF203 - one call per file
            sizes.append(None)
    return sizes


def file_entry(storage: Storage, path: str, size: int | None) -> dict[str, Any]:
    """A file in JSON output, the same in every command: ``name`` (its base name), ``path``
    (the full path or URL) and ``size`` (bytes; null if unknown)."""
    return {"name": posixpath.basename(path), "path": storage.url(path), "size": size}


_GLOB = re.compile(r"[*?\[]")


def select_keys(
    keys: Sequence[str], include: Sequence[str], exclude: Sequence[str] = (), *, where: str
) -> Sequence[str]:
    """The tensor names to work on: ``keys`` matching any ``include`` pattern (all when there
    is none: ``keys`` itself, not a copy), minus those matching an ``exclude`` pattern.
    Patterns are shell globs over the whole name (``encoder/*``, ``*/kernel``; ``*`` also
    matches ``/``); a name without glob characters must exist, and every include pattern must
    match something (exit 3)."""
    if include:
        chosen: dict[str, None] = {}
        known = set(keys)
        for pattern in include:
            if _GLOB.search(pattern):
                matched = [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
            else:
                matched = [pattern] if pattern in known else []
            if not matched:
                what = "no tensor matches" if _GLOB.search(pattern) else "no tensor"
                raise CliError(
                    f"{what} {pattern!r} in {where} ({plural(len(keys), 'tensor')}; "
                    "'anyckpt inspect PREFIX' lists them)",
                    ExitCode.NOT_FOUND,
                )
            chosen.update(dict.fromkeys(matched))
        selected: Sequence[str] = list(chosen)
    else:
        selected = keys
    if exclude:
        selected = [k for k in selected if not any(fnmatch.fnmatchcase(k, p) for p in exclude)]
    return selected


def add_no_verify(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--no-verify",
        dest="no_verify",
        action="store_true",
        help=f"do not check checksums when reading ({what}: salvage a damaged checkpoint)",
    )


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"

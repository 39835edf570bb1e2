"""What every command shares: exit codes, the run context, option parsing, finding a checkpoint."""

from __future__ import annotations

import json
import posixpath
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import IO, Any

from ..codecs.state_file import relativize
from ..errors import CheckpointNotFoundError
from ..formats import detect_format
from ..formats.base import CheckpointFormat, TensorSpec
from ..manager import read_state
from ..storage import Storage
from ._output import Progress, stream_is_terminal


class ExitCode(IntEnum):
    """The ``anyckpt`` command's exit status (documented in docs/cli.md)."""

    OK = 0
    #: ``verify`` found damage, ``diff`` found differences, or a file is corrupt.
    DAMAGE = 1
    #: Bad command line (unknown option, missing argument, malformed value).
    USAGE = 2
    #: A directory, checkpoint, file or tensor does not exist.
    NOT_FOUND = 3
    #: A format, dtype or feature anyckpt does not support.
    UNSUPPORTED = 4
    #: Refused or failed: the target exists, an unsafe path, another writer, an I/O error.
    FAILED = 5
    #: A bug in anyckpt (the message says so; ``--debug`` shows the traceback).
    INTERNAL = 70
    #: Interrupted (Ctrl-C).
    INTERRUPTED = 130
    #: The output pipe closed early (``anyckpt ls DIR | head``); nothing is printed.
    BROKEN_PIPE = 141


class CliError(Exception):
    """An error the CLI reports as one line and an exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


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


_FILE_SUFFIX = re.compile(r"\.(index|data-\d{5}-of-\d{5})$")


async def find_checkpoint(ctx: Context, target: str) -> Checkpoint:
    """The checkpoint ``target`` names: a prefix (``DIR/ckpt-5``), one of its files
    (``DIR/ckpt-5.index``), or a directory (its latest checkpoint, from the state file)."""
    storage, path = ctx.storage(target)
    try:
        return Checkpoint(storage, path, await detect_format(storage, path))
    except CheckpointNotFoundError:
        pass
    stripped = _FILE_SUFFIX.sub("", path)
    if stripped != path:
        try:
            return Checkpoint(storage, stripped, await detect_format(storage, stripped))
        except CheckpointNotFoundError:
            pass
    state = await read_state(storage, path)
    if state is not None and state.model_checkpoint_path:
        name = relativize(state.model_checkpoint_path, path)
        prefix = posixpath.join(path, name)
        try:
            return Checkpoint(storage, prefix, await detect_format(storage, prefix))
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"the state file names {name!r} as the latest checkpoint, but it does not exist",
                path=storage.url(path),
            ) from None
    raise CheckpointNotFoundError(
        "no checkpoint here (neither a checkpoint prefix such as DIR/ckpt-5 "
        "nor a directory with a 'checkpoint' state file)",
        path=storage.url(path),
    )


def tensor_nbytes(spec: TensorSpec) -> int:
    """Bytes a tensor occupies (stored size when the format knows it)."""
    if spec.nbytes is not None:
        return spec.nbytes
    return spec.size * (spec.dtype.itemsize if spec.dtype.kind != "O" else 1)


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"

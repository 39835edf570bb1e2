"""The command's exit codes and its own error: imported before anything heavy (``--version``
and ``--help`` load nothing else)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CliError", "ExitCode"]


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
    #: Refused or failed: the target exists, an unsafe path, another writer, an I/O error, a
    #: remote store that cannot be reached or has no credentials (the message says which).
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

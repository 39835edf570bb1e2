"""The ``anyckpt`` command (also ``python -m anyckpt``).

Commands: ``demo``, ``ls``, ``inspect``, ``verify``, ``convert``, ``diff``, ``prune``. Every one
takes ``--json`` (one JSON document on stdout), ``--debug`` (tracebacks), ``--no-progress`` and
``--storage-option KEY=VALUE`` (fsspec options for remote paths). A progress bar is drawn on
stderr only when it is a terminal. Errors are one line, ``anyckpt: error: <message>``, and the
exit status says what kind (:class:`ExitCode`, documented in docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import anyio

from .. import __version__
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)
from . import _convert, _demo, _diff, _inspect, _ls, _prune, _verify
from ._common import CliError, Context, ExitCode, parse_key_values

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["ExitCode", "build_parser", "main"]

PROG = "anyckpt"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        print(f"{PROG}: error: {message} ({hint})", file=sys.stderr, flush=True)
        raise SystemExit(ExitCode.USAGE)


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command name."""
    default: Any = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument(
        "--json",
        action="store_true",
        default=default if suppress else False,
        help="print one JSON document on stdout instead of text",
    )
    g.add_argument(
        "--debug",
        action="store_true",
        default=default if suppress else False,
        help="show the traceback of an error",
    )
    g.add_argument(
        "--no-progress",
        dest="no_progress",
        action="store_true",
        default=default if suppress else False,
        help="no progress bar (it is drawn only when stderr is a terminal anyway)",
    )
    g.add_argument(
        "--storage-option",
        "-o",
        dest="storage_option",
        action="append",
        default=default if suppress else [],
        metavar="KEY=VALUE",
        help="fsspec storage option for remote paths, e.g. anon=true or "
        "endpoint_url=http://127.0.0.1:9000 (repeatable; JSON values are parsed)",
    )
    g.add_argument(
        "--allow-symlinks",
        dest="allow_symlinks",
        action="store_true",
        default=default if suppress else False,
        help="read checkpoint files that are symbolic links leaving their directory "
        "(refused by default)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        parents=[_common_options(suppress=False)],
        description="Inspect, verify, convert and manage TensorFlow-compatible checkpoints "
        "on local disk or any fsspec filesystem (s3://, gs://, memory://...).",
        epilog="Exit status: 0 ok, 1 damage or differences found, 2 usage error, 3 not found, "
        "4 unsupported format, 5 other failure, 70 internal error, 130 interrupted. "
        "Docs: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    common = _common_options(suppress=True)
    for module in (_demo, _ls, _inspect, _verify, _convert, _diff, _prune):
        module.add_parser(sub, common)
    return parser


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _classify(exc: BaseException) -> tuple[ExitCode, str]:
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, CheckpointNotFoundError):
        return ExitCode.NOT_FOUND, str(exc)
    if isinstance(exc, CorruptCheckpointError):
        return ExitCode.DAMAGE, f"corrupt checkpoint: {exc}"
    if isinstance(exc, UnsupportedFormatError):
        return ExitCode.UNSUPPORTED, str(exc)
    if isinstance(exc, CheckpointError):
        return ExitCode.FAILED, str(exc)
    if isinstance(exc, FileNotFoundError):
        return ExitCode.NOT_FOUND, f"{exc.filename or ''}: no such file or directory".lstrip(": ")
    if isinstance(exc, PermissionError):
        return ExitCode.FAILED, f"{exc.filename or ''}: permission denied".lstrip(": ")
    if isinstance(exc, OSError):
        return ExitCode.FAILED, str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(exc, ImportError):
        return ExitCode.FAILED, f"{exc} (is the package for this URL's protocol installed?)"
    return (
        ExitCode.INTERNAL,
        f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback, "
        "and please report it)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``anyckpt`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else ExitCode.USAGE
    debug = bool(args.debug)
    try:
        ctx = Context(
            json=args.json,
            debug=debug,
            progress=not args.no_progress,
            storage_options=parse_key_values(args.storage_option, "--storage-option"),
            allow_symlinks=bool(args.allow_symlinks),
        )
        return int(anyio.run(args.run, ctx, args))
    except BaseException as raw:
        if isinstance(raw, SystemExit):
            raise
        error = _leaf(raw)
        if isinstance(error, BrokenPipeError):
            # The reader of our output went away (``anyckpt ls | head``): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return ExitCode.BROKEN_PIPE
        code, message = _classify(error)
        if debug:
            traceback.print_exception(error)
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return code

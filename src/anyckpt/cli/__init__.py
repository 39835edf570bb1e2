"""The ``anyckpt`` command (also ``python -m anyckpt``).

Commands: ``demo``, ``ls``, ``inspect``, ``verify``, ``convert``, ``diff``, ``prune``. Every one
takes ``--json`` (one JSON document on stdout), ``--debug`` (tracebacks), ``--no-progress`` and
``--storage-option KEY=VALUE`` (fsspec options for remote paths). A progress bar is drawn on
stderr only when it is a terminal. Errors are one line, ``anyckpt: error: <message>``, and the
exit status says what kind (:class:`ExitCode`, documented in docs/cli.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .. import __version__
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidOptionError,
    PluginWarning,
    UnsupportedFormatError,
)
from ._exit import CliError, ExitCode

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["ExitCode", "build_parser", "main"]

PROG = "anyckpt"
#: Loggers of the storage clients, silenced unless ``--debug``: the error line says it all.
_LIBRARY_LOGGERS = ("gcsfs", "s3fs", "fsspec", "botocore", "aiobotocore", "google", "grpc")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        print(f"{PROG}: error: {message} ({hint})", file=sys.stderr, flush=True)
        raise _UsageError(f"{message} ({hint})")


class _UsageError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(ExitCode.USAGE)
        self.message = message


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


#: The commands, in the order ``--help`` lists them, and their modules' one-line help (the
#: modules are imported only to run a command or show its own help: ``anyckpt --help`` and
#: ``--version`` load neither NumPy nor fsspec). tests/test_cli_startup.py checks that this
#: is what the modules say.
COMMANDS = {
    "demo": "train a small NumPy model with background checkpoints, stop, resume, verify",
    "ls": "list the checkpoints in a directory",
    "inspect": "show a checkpoint's format, files and tensors",
    "verify": "read everything and check every checksum",
    "convert": "rewrite a checkpoint in another format",
    "diff": "compare the tensors of two checkpoints",
    "prune": "apply the retention policy now (what it deletes, and why)",
}


def build_parser(*, commands: bool = True) -> argparse.ArgumentParser:
    """The command line's parser. ``commands=False``: the commands by name and help only
    (enough for ``--help``, ``--version`` and usage errors), without importing them."""
    parser = _Parser(
        prog=PROG,
        parents=[_common_options(suppress=False)],
        description="Inspect, verify, convert and manage TensorFlow-compatible checkpoints "
        "on local disk or any fsspec filesystem (s3://, gs://, memory://...).",
        epilog="Exit status: 0 ok, 1 damage or differences found, 2 usage error, 3 not found, "
        "4 unsupported format, 5 other failure (remote store unreachable or without "
        "credentials too), 70 internal error, 130 interrupted. Docs: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    if not commands:
        for name, text in COMMANDS.items():
            sub.add_parser(name, help=text, add_help=False)
        return parser
    from . import _convert, _demo, _diff, _inspect, _ls, _prune, _verify

    common = _common_options(suppress=True)
    for module in (_demo, _ls, _inspect, _verify, _convert, _diff, _prune):
        module.add_parser(sub, common)
    return parser


def _names_a_command(argv: Sequence[str]) -> bool:
    """Whether the command line names a command (else the light parser answers it)."""
    return any(arg in COMMANDS for arg in argv)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _classify(exc: BaseException) -> tuple[ExitCode, str]:
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, InvalidOptionError):
        return ExitCode.USAGE, str(exc)
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
    from ..formats import plugin_error

    blamed = plugin_error(exc)  # a bug in a format plugin is not ours to report
    if blamed is not None:
        return ExitCode.FAILED, str(blamed)
    if isinstance(exc, ImportError):
        return ExitCode.FAILED, f"{exc} (is the package for this URL's protocol installed?)"
    return (
        ExitCode.INTERNAL,
        f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback, "
        "and please report it)",
    )


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
    """Plugin warnings as one line (``anyckpt: warning: ...``), others as Python shows them."""
    if issubclass(category, PluginWarning):
        print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)
    else:
        _default_show(message, category, *args, **kw)


_default_show = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``anyckpt`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    status. Ctrl-C at any point, loading included, exits 130 with one line."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr, flush=True)
        return ExitCode.INTERRUPTED


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the command loads (about a second), then raise it: a
    KeyboardInterrupt raised inside an extension module's initialisation can come out as
    some other error (NumPy's: an ImportError with its troubleshooting essay)."""
    pressed: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    with _ctrl_c_deferred():
        parser = build_parser(commands=_names_a_command(argv))
        if _names_a_command(argv):
            import anyio  # loaded here, under the deferral, for the run below

            from . import _common  # noqa: F401
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if isinstance(exc, _UsageError) and "--json" in argv:
            from ._output import print_error_json

            print_error_json(ExitCode.USAGE, exc.message)
        return int(exc.code) if isinstance(exc.code, int) else ExitCode.USAGE
    debug = bool(args.debug)
    if not debug:  # the client libraries' own log lines (gcsfs's fallbacks...) are not ours
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        import anyio

        from ._common import Context, parse_key_values

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
        if args.json:
            from ._output import print_error_json

            print_error_json(code, message)
        return code

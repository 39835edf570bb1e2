"""``anyckpt verify PREFIX|DIR``: read every tensor, check every checksum, name what is damaged."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..errors import CheckpointError, CheckpointNotFoundError, StorageAccessError
from ..formats.base import (
    CheckpointFormat,
    CheckpointReader,
    TensorSpec,
    has_checksums,
    key_view,
)
from ..formats.resolve import path_kind
from ..manager import STATE_FILE
from ..storage import Storage
from ._common import Checkpoint, CliError, Context, ExitCode, find_checkpoint, tensor_nbytes
from ._output import Progress, format_bytes, format_duration, plural, print_json
from ._scan import scan


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="read everything and check every checksum",
        description="Read every tensor of a checkpoint (PREFIX) or of every checkpoint in a "
        "directory (DIR) and check every checksum. Exits 1 if anything is damaged, naming the "
        "file and the tensor.",
    )
    p.add_argument("target", metavar="PREFIX|DIR")
    p.set_defaults(run=run)


NO_CHECKSUMS = "structure checked; this format has no checksums"


@dataclass
class Problem:
    message: str
    file: str | None = None
    tensor: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "tensor": self.tensor, "error": self.message}


@dataclass
class Report:
    prefix: str
    format: str
    #: Whether the format has checksums (without, only the structure is checked).
    checksums: bool = True
    tensors: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: Files that could not be read for lack of permission: path -> tensors not checked.
    denied: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.denied

    def status(self) -> str:
        if self.problems:
            return "DAMAGED"
        return "UNREADABLE" if self.denied else "ok"


async def verify_checkpoint(
    storage: Storage,
    path: str,
    fmt: CheckpointFormat,
    bar: Progress,
    reader: CheckpointReader | None = None,
) -> Report:
    """Read every tensor of one checkpoint with checksums on; collect what fails. A file that
    cannot be read for lack of permission is one access error, not damage. ``reader``: the
    checkpoint already open (closed here), else it is opened."""
    report = Report(storage.url(path), fmt.name, has_checksums(fmt))
    if reader is None:
        try:
            reader = await fmt.open(storage, path)
        except StorageAccessError:  # the store cannot be used: not damage
            raise
        except PermissionError as exc:
            report.denied[exc.filename or report.prefix] = 0
            return report
        except CheckpointError as exc:
            report.problems.append(Problem(str(exc), exc.path))
            return report
    try:
        try:
            keys = key_view(reader)  # V2: no list of every name, no spec kept per tensor
            for key in keys:
                reader.spec(key)
        except CheckpointError as exc:  # a format may check its entries only when listed
            report.problems.append(Problem(str(exc), exc.path))
            return report
        report.tensors = len(keys)
        missing_files: dict[str, int] = {}
        limiter = anyio.CapacityLimiter(4)

        async def check(key: str) -> None:
            async with limiter:
                nbytes = tensor_nbytes(reader.spec(key))
                try:
                    await reader.read(key, verify=True)
                except StorageAccessError:
                    raise
                except CheckpointNotFoundError as exc:
                    name = exc.path or report.prefix
                    missing_files[name] = missing_files.get(name, 0) + 1
                except PermissionError as exc:
                    name = storage.url(exc.filename) if exc.filename else report.prefix
                    report.denied[name] = report.denied.get(name, 0) + 1
                except CheckpointError as exc:
                    report.problems.append(Problem(str(exc), exc.path, key))
                except (ValueError, OSError) as exc:
                    report.problems.append(Problem(f"tensor {key!r}: {exc}", report.prefix, key))
                else:
                    report.bytes += nbytes
                bar.advance(nbytes)

        async def check_batch(batch: list[str], nbytes: int) -> None:
            """One ``read_many`` for the batch; if it fails, each key again on its own, so the
            report names every damaged tensor exactly as a key-by-key pass would."""
            try:
                await reader.read_many(batch, verify=True)
            except StorageAccessError:
                raise
            except (CheckpointError, PermissionError, ValueError, OSError):
                async with anyio.create_task_group() as tg:
                    for key in batch:
                        tg.start_soon(check, key)
                return
            report.bytes += nbytes
            bar.advance(nbytes)

        for batch, nbytes in _batches(keys, reader.spec):
            await check_batch(batch, nbytes)
        for name, count in missing_files.items():
            report.problems.append(
                Problem(f"{name}: file is missing ({plural(count, 'tensor')} unreadable)", name)
            )
        report.problems.sort(key=lambda p: (p.file or "", p.tensor or ""))
    finally:
        await reader.aclose()
    return report


#: Keys and tensor bytes per ``read_many`` batch: few calls per checkpoint, bounded memory.
BATCH_KEYS = 4096
BATCH_BYTES = 64 << 20


def _batches(
    keys: Iterable[str], spec_of: Callable[[str], TensorSpec]
) -> Iterator[tuple[list[str], int]]:
    """``keys`` in order, cut into batches of at most :data:`BATCH_KEYS` keys and
    :data:`BATCH_BYTES` tensor bytes (a larger tensor is a batch of its own), with each
    batch's tensor bytes."""
    batch: list[str] = []
    held = 0
    for key in keys:
        nbytes = tensor_nbytes(spec_of(key))
        if batch and (len(batch) >= BATCH_KEYS or held + nbytes > BATCH_BYTES):
            yield batch, held
            batch, held = [], 0
        batch.append(key)
        held += nbytes
    if batch:
        yield batch, held


def denied_text(name: str, count: int) -> str:
    what = f" ({plural(count, 'tensor')} not checked)" if count else ""
    return f"{name}: permission denied{what}"


async def _total_bytes(
    storage: Storage, path: str, fmt: CheckpointFormat, keep: bool = False
) -> tuple[int, CheckpointReader | None]:
    """The tensor bytes of one checkpoint (0 if it cannot be listed: its check says why),
    and, if ``keep``, the reader that listed it, still open (else None)."""
    try:
        reader = await fmt.open(storage, path)
    except CheckpointError:
        return 0, None
    try:
        total = sum(tensor_nbytes(reader.spec(k)) for k in key_view(reader))
    except CheckpointError:
        await reader.aclose()
        return 0, None
    except BaseException:
        await reader.aclose()
        raise
    if keep:
        return total, reader
    await reader.aclose()
    return total, None


async def run(ctx: Context, args: argparse.Namespace) -> int:
    storage, path = ctx.storage(args.target)
    targets: list[Checkpoint] = []
    dir_problems: list[Problem] = []
    directory: str | None = None
    if await anyio.to_thread.run_sync(path_kind, storage, path) == "dir":
        listing = await scan(storage, path)
        directory = listing.url
        state_path = f"{listing.url}/{STATE_FILE}"
        if listing.state_error:
            reason = f"unreadable state file: {listing.state_error}"
            dir_problems.append(Problem(reason, state_path))
        dir_problems += [
            Problem(f"the state file names {name!r}, which does not exist", state_path)
            for name in listing.missing
        ]
        dir_problems += [
            Problem(f"the state file names {raw!r}, outside the directory", state_path)
            for raw in listing.unsafe
        ]
        targets = [Checkpoint(storage, c.path, c.format) for c in listing.checkpoints]
        for orphan in listing.orphans:
            ctx.warn(f"{listing.url}/{orphan.name}: {orphan.reason} (not checked)")
    else:
        targets.append(await find_checkpoint(ctx, args.target))

    if directory is not None and not targets and not dir_problems:
        raise CliError(f"{directory}: no checkpoints to verify", ExitCode.NOT_FOUND)
    started = anyio.current_time()
    # One checkpoint is listed once: its reader, open for the progress bar's total, verifies
    # it (a second open held a second index while the first one's memory was not yet back).
    # Of several, each is opened again in turn, so one index is held at a time.
    keep = len(targets) == 1
    sized = [await _total_bytes(t.storage, t.path, t.format, keep) for t in targets]
    reports: list[Report] = []
    with ctx.progress_bar("verifying", sum(total for total, _ in sized)) as bar:
        for target, (_, opened) in zip(targets, sized, strict=True):
            report = await verify_checkpoint(
                target.storage, target.path, target.format, bar, opened
            )
            reports.append(report)
            bar.clear()
            if report.ok:
                note = "" if report.checksums else f"; {NO_CHECKSUMS}"
                ctx.echo(
                    f"ok       {report.prefix}  ({plural(report.tensors, 'tensor')}, "
                    f"{format_bytes(report.bytes)}{note})"
                )
            else:
                ctx.echo(f"{report.status():<8} {report.prefix}")
                for problem in report.problems:
                    ctx.echo(f"  {problem.message}")
                for name, count in report.denied.items():
                    ctx.echo(f"  {denied_text(name, count)}")
    elapsed = anyio.current_time() - started
    problems = [*dir_problems, *(p for r in reports for p in r.problems)]
    denied = [(name, n) for r in reports for name, n in r.denied.items()]
    good = [r for r in reports if r.ok]

    if ctx.json:
        print_json(
            {
                "ok": not problems and not denied,
                "directory": directory,
                "problems": [p.as_json() for p in dir_problems],
                "checkpoints": [
                    {
                        "prefix": r.prefix,
                        "format": r.format,
                        "ok": r.ok,
                        "checksums": r.checksums,
                        "tensors": r.tensors,
                        "bytes": r.bytes,
                        "problems": [p.as_json() for p in r.problems],
                        "permission_denied": [
                            {"file": name, "tensors": n} for name, n in r.denied.items()
                        ],
                    }
                    for r in reports
                ],
            },
            ctx.out,
        )
    else:
        for problem in dir_problems:
            ctx.echo(f"DAMAGED  {problem.file or directory}: {problem.message}")
        n_bytes = sum(r.bytes for r in reports)
        if reports:
            unchecked = [r for r in reports if r.ok and not r.checksums]
            note = (
                f" ({len(unchecked)} of a format without checksums: structure only)"
                if unchecked
                else ""
            )
            ctx.echo(
                f"{len(good)} of {plural(len(reports), 'checkpoint')} ok{note}, "
                f"{format_bytes(n_bytes)} read and checked in {format_duration(elapsed)}"
            )
        else:
            ctx.echo("no checkpoints checked")
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"anyckpt: error: damaged: {first.message}{more}", file=ctx.err, flush=True)
        return ExitCode.DAMAGE
    if denied:
        more = f" (and {len(denied) - 1} more)" if len(denied) > 1 else ""
        message = f"cannot read {denied_text(*denied[0])}{more}"
        print(f"anyckpt: error: {message}", file=ctx.err, flush=True)
        return ExitCode.FAILED
    return ExitCode.OK

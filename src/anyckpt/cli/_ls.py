"""``anyckpt ls DIR``: the checkpoints a directory holds."""

from __future__ import annotations

import argparse
import posixpath
import time
from typing import Any

import anyio.to_thread

from ..lease import LOCK_FILE
from ..storage import Storage
from ._common import Context, ExitCode
from ._output import format_bytes, format_time, plural, print_json, table
from ._scan import PRESERVED, TRACKED, UNCOMMITTED, UNTRACKED, FileInfo, Listing, scan

LEGEND = {
    TRACKED: "in the state file; retention counts it and may delete it",
    PRESERVED: "kept forever: retention never deletes it (preserved by "
    "keep_checkpoint_every_n_hours, saved outside a manager, or listed without a timestamp)",
    UNTRACKED: "no state file: no manager has recorded it",
    UNCOMMITTED: "complete, but saved after the latest commit and never recorded "
    "(a manager opening the directory removes it)",
}


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "ls",
        parents=[common],
        help="list the checkpoints in a directory",
        description="List the checkpoints in DIR: step, save time, size, files, which is the "
        "latest, which retention tracks and which it keeps forever, and what an interrupted "
        "save left behind. Reads directories written by TensorFlow too.",
    )
    p.add_argument(
        "directories",
        metavar="DIR",
        nargs="+",
        help="a local directory or fsspec URL (several may be given)",
    )
    p.add_argument(
        "--recursive",
        "-r",
        action="store_true",
        help="also list every subdirectory that holds checkpoints, with a total size",
    )
    p.set_defaults(run=run)


def listing_json(listing: Listing) -> dict[str, Any]:
    state = listing.state
    return {
        "directory": listing.url,
        "state_file": None
        if state is None
        else {
            "model_checkpoint_path": state.model_checkpoint_path,
            "all_model_checkpoint_paths": list(state.all_model_checkpoint_paths),
            "all_model_checkpoint_timestamps": list(state.all_model_checkpoint_timestamps),
            "last_preserved_timestamp": state.last_preserved_timestamp,
        },
        "state_file_error": listing.state_error,
        "latest": listing.latest,
        "checkpoints": [
            {
                "name": c.name,
                "prefix": c.url,
                "step": c.step,
                "format": c.format.name,
                "time": c.time,
                "time_source": c.time_source,
                "size": c.size,
                "files": [_file(listing, f) for f in c.files],
                "status": c.status,
                "latest": c.latest,
                "in_state_file": c.in_state_file,
                "metrics": c.metrics,
            }
            for c in listing.checkpoints
        ],
        "missing": listing.missing,
        "unsafe_paths": listing.unsafe,
        "orphans": [
            {**_file(listing, FileInfo(o.name, o.size, None)), "reason": o.reason}
            for o in listing.orphans
        ],
        "other_files": [_file(listing, f) for f in listing.other],
        "size": listing_size(listing),
        "unreadable": [
            {
                "name": u.name,
                "files": [_file(listing, f) for f in u.files],
                "reason": u.reason,
            }
            for u in listing.unreadable
        ],
        "uploads": [
            {"name": posixpath.basename(u.path), "initiated": u.initiated, "size": u.size}
            for u in listing.uploads
        ],
        "lock": None
        if listing.lock is None
        else {
            "holder": listing.lock.holder,
            "lease": listing.lock.lease,
            "running": listing.lock.running,
            "expired": listing.lock.expired,
            "next_open": listing.lock.next_open,
        },
    }


def _file(listing: Listing, info: FileInfo) -> dict[str, Any]:
    """A file entry as every command's JSON has it (``name``, ``path``, ``size``)."""
    path = posixpath.join(listing.root, info.name)
    return {"name": info.name, "path": listing.storage.url(path), "size": info.size}


def listing_size(listing: Listing) -> int:
    """Bytes of the directory's checkpoints."""
    return sum(c.size for c in listing.checkpoints)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _print_extras(ctx: Context, listing: Listing) -> None:
    """Unreadable checkpoints, unfinished uploads and a leftover lock."""
    for u in listing.unreadable:
        names = ", ".join(f.name for f in u.files)
        ctx.echo(f"  unreadable: the state file names {u.name!r}, whose files ({names}) are")
        ctx.echo(f"    present but could not be read: {u.reason}")
    if listing.uploads:
        now = time.time()
        ctx.echo()
        ctx.echo(
            "unfinished multipart uploads (left by a process killed mid-upload; billed, "
            "invisible to listings; a manager opening this directory, or 'anyckpt prune', "
            "aborts those named like its checkpoints):"
        )
        rows = [
            [
                posixpath.basename(u.path),
                format_bytes(u.size),
                "?" if u.initiated is None else f"started {_age(now - u.initiated)} ago",
            ]
            for u in listing.uploads
        ]
        ctx.echo(table(rows, right=(1,), indent="  "))
    lock = listing.lock
    if lock is not None:
        kind = "lease" if lock.lease else "lock"
        state = ""
        if lock.running is not None:
            state = ", process running" if lock.running else ", process no longer running"
        if lock.expired is not None:
            state += ", expired" if lock.expired else ", not expired"
        ctx.echo()
        ctx.echo(f"{LOCK_FILE}: {kind} held by {lock.holder_text}{state}")
        ctx.echo(f"  {lock.next_open}")


def print_listing(ctx: Context, listing: Listing) -> None:
    state = listing.state
    if listing.state_error:
        head = f"state file: unreadable ({listing.state_error})"
    elif state is None:
        head = "no state file"
    else:
        head = "state file: checkpoint"
    if listing.checkpoints:
        head += f"; {plural(len(listing.checkpoints), 'checkpoint')}, "
        head += format_bytes(listing_size(listing))
    ctx.echo(f"{listing.url}  ({head})")
    if listing.checkpoints:
        rows = [["STEP", "CHECKPOINT", "SAVED", "SIZE", "FILES", "FORMAT", "STATUS"]]
        rows += [
            [
                "-" if c.step is None else str(c.step),
                c.name,
                format_time(c.time),
                format_bytes(c.size),
                str(len(c.files)),
                c.format.name,
                c.status + (", latest" if c.latest else ""),
            ]
            for c in listing.checkpoints
        ]
        if any(c.metrics for c in listing.checkpoints):  # one more column, only if recorded
            rows[0].append("METRICS")
            for row, c in zip(rows[1:], listing.checkpoints, strict=True):
                row.append(format_metrics(c.metrics))
        ctx.echo(table(rows, right=(0, 3, 4), indent="  "))
        ctx.echo()
        for status in (TRACKED, PRESERVED, UNTRACKED, UNCOMMITTED):
            if any(c.status == status for c in listing.checkpoints):
                legend = LEGEND[status]
                if status == UNTRACKED and listing.state_error:
                    legend = "the state file is unreadable: nothing counts as recorded"
                ctx.echo(f"  {status}: {legend}")
    else:
        ctx.echo("  no checkpoints")
    for name in listing.missing:
        ctx.echo(f"  missing: the state file names {name!r}, which is not on disk")
    for raw in listing.unsafe:
        ctx.echo(f"  refused: the state file names {raw!r}, outside this directory")
    for problem in listing.problems:
        ctx.echo(f"  unreadable: {problem}")
    if listing.orphans:
        ctx.echo()
        ctx.echo(
            f"left by interrupted saves (removed by a manager named {listing.debris_name!r} "
            "opening this directory, and by 'anyckpt prune'):"
        )
        rows = [[o.name, format_bytes(o.size), o.reason] for o in listing.orphans]
        ctx.echo(table(rows, right=(1,), indent="  "))
    _print_extras(ctx, listing)
    if listing.other:
        names = ", ".join(f.name for f in listing.other[:5])
        more = f" and {len(listing.other) - 5} more" if len(listing.other) > 5 else ""
        ctx.echo()
        ctx.echo(f"other files: {names}{more}")


def format_metrics(metrics: dict[str, float] | None) -> str:
    """``loss=0.3 acc=0.9``, or ``-``."""
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) if metrics else "-"


def _subdirectories(storage: Storage, root: str) -> list[str]:
    """Every directory under ``root`` (not ``root`` itself), sorted."""
    return storage.subdirectories(root)


async def _listings(ctx: Context, target: str, recursive: bool) -> list[Listing]:
    storage, root = ctx.storage(target)
    first = await scan(storage, root)
    if not recursive:
        return [first]
    listings = [first]
    for sub in await anyio.to_thread.run_sync(_subdirectories, storage, root):
        listing = await scan(storage, sub)
        if listing.checkpoints or listing.state is not None or listing.state_error:
            listings.append(listing)
    return listings


async def run(ctx: Context, args: argparse.Namespace) -> int:
    listings: list[Listing] = []
    for target in args.directories:
        listings += await _listings(ctx, target, args.recursive)
    several = len(args.directories) > 1 or args.recursive
    total = sum(listing_size(listing) for listing in listings)
    count = sum(len(listing.checkpoints) for listing in listings)
    # Present but unreadable checkpoints are never "fine" (4: no format reads them; 5: failed).
    unreadable = [u for listing in listings for u in listing.unreadable]
    status = ExitCode(max(u.exit_code for u in unreadable)) if unreadable else ExitCode.OK
    if ctx.json:
        if several:
            document = {
                "directories": [listing_json(listing) for listing in listings],
                "checkpoints": count,
                "size": total,
            }
            print_json(document, ctx.out)
        else:
            print_json(listing_json(listings[0]), ctx.out)
        return status
    for i, listing in enumerate(listings):
        if i:
            ctx.echo()
        print_listing(ctx, listing)
    if several:
        ctx.echo()
        dirs = plural(len(listings), "directory", "directories")
        ctx.echo(f"total: {plural(count, 'checkpoint')} in {dirs}, {format_bytes(total)}")
    return status

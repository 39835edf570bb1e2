"""``anyckpt ls DIR``: the checkpoints a directory holds."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import Context, ExitCode
from ._output import format_bytes, format_time, print_json, table
from ._scan import PRESERVED, TRACKED, UNCOMMITTED, UNTRACKED, Listing, scan

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
    p.add_argument("directory", metavar="DIR", help="a local directory or fsspec URL")
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
                "files": [{"name": f.name, "size": f.size} for f in c.files],
                "status": c.status,
                "latest": c.latest,
                "in_state_file": c.in_state_file,
                "metrics": c.metrics,
            }
            for c in listing.checkpoints
        ],
        "missing": listing.missing,
        "unsafe_paths": listing.unsafe,
        "orphans": [{"name": o.name, "size": o.size, "reason": o.reason} for o in listing.orphans],
        "other_files": [{"name": f.name, "size": f.size} for f in listing.other],
    }


def print_listing(ctx: Context, listing: Listing) -> None:
    state = listing.state
    if listing.state_error:
        head = f"state file: unreadable ({listing.state_error})"
    elif state is None:
        head = "no state file"
    else:
        head = "state file: checkpoint"
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
                ctx.echo(f"  {status}: {LEGEND[status]}")
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
        ctx.echo("left by an interrupted save (a manager opening this directory removes those")
        ctx.echo("named like its checkpoints):")
        rows = [[o.name, format_bytes(o.size), o.reason] for o in listing.orphans]
        ctx.echo(table(rows, right=(1,), indent="  "))
    if listing.other:
        names = ", ".join(f.name for f in listing.other[:5])
        more = f" and {len(listing.other) - 5} more" if len(listing.other) > 5 else ""
        ctx.echo()
        ctx.echo(f"other files: {names}{more}")


def format_metrics(metrics: dict[str, float] | None) -> str:
    """``loss=0.3 acc=0.9``, or ``-``."""
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) if metrics else "-"


async def run(ctx: Context, args: argparse.Namespace) -> int:
    storage, root = ctx.storage(args.directory)
    listing = await scan(storage, root)
    if ctx.json:
        print_json(listing_json(listing), ctx.out)
    else:
        print_listing(ctx, listing)
    return ExitCode.OK

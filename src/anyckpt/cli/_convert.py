"""``anyckpt convert SRC DST --format F``: rewrite a checkpoint in any registered format."""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio.to_thread
import numpy as np

from ..errors import CheckpointNotFoundError
from ..formats import available_formats, detect_format, get_format
from ..formats.base import check_options
from ._common import CliError, Context, ExitCode, find_checkpoint, parse_key_values, tensor_nbytes
from ._output import format_bytes, format_duration, print_json


def _formats_help() -> str:
    try:
        return ", ".join(available_formats())
    except Exception:  # a broken plugin must not break --help
        return "v2"


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="rewrite a checkpoint in another format",
        description="Read every tensor of SRC (any format anyckpt reads) and write them as a "
        "checkpoint of --format at DST. Partitioned variables are written whole.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint prefix (or directory: its latest)")
    p.add_argument("dst", metavar="DST", help="prefix to write")
    p.add_argument(
        "--format",
        "-f",
        default="v2",
        metavar="FORMAT",
        help=f"target format (default v2; available: {_formats_help()})",
    )
    p.add_argument(
        "--format-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the target format's writer (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="replace a checkpoint already at DST")
    p.set_defaults(run=run)


async def run(ctx: Context, args: argparse.Namespace) -> int:
    fmt = get_format(args.format)
    options = parse_key_values(args.format_option, "--format-option")
    check_options(fmt, options)
    src = await find_checkpoint(ctx, args.src)
    dst_storage, dst_path = ctx.storage(args.dst)
    dst_url = dst_storage.url(dst_path)
    if dst_storage.url(dst_path) == src.url:
        raise CliError("SRC and DST are the same checkpoint", ExitCode.USAGE)
    try:
        existing = await detect_format(dst_storage, dst_path)
    except CheckpointNotFoundError:
        existing = None
    if existing is not None and not args.force:
        raise CliError(f"{dst_url}: a checkpoint exists here (pass --force to replace it)")

    started = time.perf_counter()
    reader = await src.format.open(src.storage, src.path)
    try:
        keys = reader.keys()
        total = sum(tensor_nbytes(reader.spec(k)) for k in keys)
        tensors: dict[str, np.ndarray] = {}
        with ctx.progress_bar("reading", total) as bar:
            for key in keys:
                tensors[key] = await reader.read(key)
                bar.advance(tensor_nbytes(reader.spec(key)))
    finally:
        await reader.aclose()
    read_seconds = time.perf_counter() - started

    if existing is not None:
        for path in reversed(await existing.files(dst_storage, dst_path)):
            await anyio.to_thread.run_sync(dst_storage.remove, path)
    with ctx.progress_bar("writing", None) as bar:
        bar.note = f"{format_bytes(total)} as {fmt.name}"
        bar.draw(force=True)
        written = await fmt.write(dst_storage, dst_path, tensors, durable=True, options=options)
    elapsed = time.perf_counter() - started

    if ctx.json:
        print_json(
            {
                "src": src.url,
                "src_format": src.format.name,
                "dst": dst_url,
                "format": fmt.name,
                "tensors": len(keys),
                "bytes": total,
                "files": [dst_storage.url(p) for p in written],
                "seconds": elapsed,
            },
            ctx.out,
        )
    else:
        ctx.echo(
            f"converted {src.url} ({src.format.name}) -> {dst_url} ({fmt.name}): "
            f"{len(keys)} tensors, {format_bytes(total)} in {format_duration(elapsed)} "
            f"(read {format_duration(read_seconds)})"
        )
        for path in written:
            ctx.echo(f"  {dst_storage.url(path)}")
    return ExitCode.OK

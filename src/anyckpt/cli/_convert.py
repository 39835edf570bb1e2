"""``anyckpt convert SRC DST --format F``: rewrite a checkpoint in any registered format."""

from __future__ import annotations

import argparse
import posixpath
import time
from typing import Any, cast

import anyio.to_thread
import numpy as np

from ..errors import CheckpointNotFoundError
from ..formats import available_formats, detect_format, get_format
from ..formats.base import check_options
from ..object_graph import OBJECT_GRAPH_KEY
from ..storage import FileWriter, Storage
from ._common import (
    CliError,
    Context,
    ExitCode,
    add_no_verify,
    file_entry,
    file_sizes,
    find_checkpoint,
    parse_key_values,
    select_keys,
    tensor_nbytes,
)
from ._output import Progress, format_bytes, format_duration, format_ratio, plural, print_json
from ._tf2 import DROPPED_NOTE, TF_FORMATS


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
    p.add_argument(
        "--key",
        "-k",
        action="append",
        default=[],
        metavar="GLOB",
        help="convert only the tensors with this name or matching this glob (repeatable)",
    )
    p.add_argument(
        "--exclude",
        "-x",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out the tensors matching this glob (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="replace a checkpoint already at DST")
    add_no_verify(p, "of SRC")
    p.set_defaults(run=run)


class _CountingWriter:
    """A :class:`~anyckpt.storage.FileWriter` that counts the bytes written through it."""

    def __init__(self, inner: Any, counter: list[int]) -> None:
        self._inner = inner
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "write":

            def write(data: Any) -> Any:
                result = attr(data)
                self._counter[0] += memoryview(data).nbytes
                return result

            return write
        if name == "write_many":

            def write_many(buffers: Any) -> Any:
                result = attr(buffers)
                self._counter[0] += sum(memoryview(b).nbytes for b in buffers)
                return result

            return write_many
        return attr


class CountingStorage(Storage):
    """The destination storage, counting the bytes the format writes (for the progress bar;
    counts are updated from worker threads and read by the event loop)."""

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage.fs)
        self.retry = storage.retry
        self.counter = [0]

    def open_writer(self, path: str, *, durable: bool = True) -> FileWriter:
        return cast(
            FileWriter, _CountingWriter(super().open_writer(path, durable=durable), self.counter)
        )

    def write_bytes(self, path: str, data: Any, *, durable: bool = True) -> None:
        super().write_bytes(path, data, durable=durable)
        self.counter[0] += memoryview(data).nbytes


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
        all_keys = reader.keys()
        keys = select_keys(all_keys, args.key, args.exclude, where=reader.prefix)
        if not keys:
            raise CliError(
                f"--exclude leaves no tensor of {reader.prefix} to convert", ExitCode.USAGE
            )
        total = sum(tensor_nbytes(reader.spec(k)) for k in keys)
        tensors: dict[str, np.ndarray] = {}
        with ctx.progress_bar("reading", total) as bar:
            for key in keys:
                tensors[key] = await reader.read(key, verify=not args.no_verify)
                bar.advance(tensor_nbytes(reader.spec(key)))
    finally:
        await reader.aclose()
    read_seconds = time.perf_counter() - started
    notes = []
    if OBJECT_GRAPH_KEY in tensors and fmt.name not in TF_FORMATS:
        del tensors[OBJECT_GRAPH_KEY]  # a TF2 checkpoint into a format TF does not read
        keys = [k for k in keys if k != OBJECT_GRAPH_KEY]
        notes.append(DROPPED_NOTE.format(fmt=fmt.name))

    if existing is not None:
        for path in reversed(await existing.files(dst_storage, dst_path)):
            await anyio.to_thread.run_sync(dst_storage.remove, path)
    directory = posixpath.dirname(dst_path)
    if directory:  # formats rely on it (docs/plugins.md)
        await anyio.to_thread.run_sync(dst_storage.makedirs, directory)
    counting = CountingStorage(dst_storage)
    with ctx.progress_bar("writing", None) as bar:
        bar.note = f"{format_bytes(total)} of data as {fmt.name}"
        bar.draw(force=True)
        written: list[str] = []

        async def write() -> None:
            written.extend(
                await fmt.write(counting, dst_path, tensors, durable=True, options=options)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(_tick, bar, counting.counter, tg.cancel_scope)
            await write()
            tg.cancel_scope.cancel()
        bar.done = counting.counter[0]
        bar.draw(force=True)  # the final count, before the bar is erased
    elapsed = time.perf_counter() - started
    sizes = await anyio.to_thread.run_sync(file_sizes, dst_storage, written)
    known = [s for s in sizes if s is not None]
    stored = sum(known) if len(known) == len(sizes) else None

    if ctx.json:
        print_json(
            {
                "src": src.url,
                "src_format": src.format.name,
                "dst": dst_url,
                "format": fmt.name,
                "tensors": len(keys),
                "skipped": len(all_keys) - len(keys),
                "bytes": total,
                "stored_bytes": stored,
                "files": [
                    file_entry(dst_storage, p, s) for p, s in zip(written, sizes, strict=True)
                ],
                "seconds": elapsed,
                "notes": notes,
            },
            ctx.out,
        )
    else:
        skipped = len(all_keys) - len(keys)
        left_out = f" ({skipped} left out)" if skipped else ""
        ctx.echo(
            f"converted {src.url} ({src.format.name}) -> {dst_url} ({fmt.name}): "
            f"{plural(len(keys), 'tensor')}{left_out}, {format_ratio(total, stored)} "
            f"in {format_duration(elapsed)} (read {format_duration(read_seconds)})"
        )
        for path in written:
            ctx.echo(f"  {dst_storage.url(path)}")
        for note in notes:
            ctx.echo(f"note: {note}")
    return ExitCode.OK


async def _tick(bar: Progress, counter: list[int], scope: anyio.CancelScope) -> None:
    """Redraw the write bar with the bytes written so far, until cancelled."""
    while not scope.cancel_called:
        bar.done = counter[0]
        bar.draw()
        await anyio.sleep(0.1)

"""``anyckpt inspect PREFIX``: format, files, and every tensor's dtype, shape, size, partitions."""

from __future__ import annotations

import argparse
import base64
import math
import posixpath
from typing import Any

import anyio.to_thread
import numpy as np

from ..api import meta_path, read_meta_file
from ..codecs.dtypes import tf_name
from ..errors import CheckpointNotFoundError
from ..formats.base import CheckpointReader, TensorSlice, TensorSpec
from ..meta import MetaGraphInfo
from ..storage import Storage
from ._common import CliError, Context, ExitCode, find_checkpoint, shape_text, tensor_nbytes
from ._output import format_bytes, print_json, table


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="show a checkpoint's format, files and tensors",
        description="Show the format, the files, and every tensor's dtype, shape, size and "
        "partitions. PREFIX is a checkpoint prefix (DIR/ckpt-5), one of its files, or a "
        "directory (its latest checkpoint).",
    )
    p.add_argument("prefix", metavar="PREFIX")
    p.add_argument("--values", action="store_true", help="print tensor values (NumPy style)")
    p.add_argument(
        "--key",
        "-k",
        action="append",
        default=[],
        metavar="K",
        help="only this tensor (repeatable)",
    )
    p.set_defaults(run=run)


def partition_text(part: TensorSlice, shape: tuple[int, ...]) -> str:
    """NumPy-style box of one stored slice: ``[0:4, :]``."""
    cells = []
    for (start, stop), (_, length), dim in zip(part.box(shape), part.extents, shape, strict=True):
        cells.append(":" if length == -1 or (start == 0 and stop == dim) else f"{start}:{stop}")
    return "[" + ", ".join(cells) + "]"


def file_sizes(storage: Storage, paths: list[str]) -> list[int | None]:
    sizes: list[int | None] = []
    for path in paths:
        try:
            reader = storage.open_reader(path)
        except CheckpointNotFoundError:
            sizes.append(None)
            continue
        sizes.append(reader.size)
        reader.close()
    return sizes


def jsonable(array: np.ndarray) -> Any:
    """Tensor values as JSON: numbers (non-finite as strings), text as str, other bytes as
    ``{"base64": ...}``, complex as ``[re, im]``."""
    if array.dtype == object:

        def text(item: Any) -> Any:
            data = bytes(item)
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(data).decode("ascii")}

        flat: list[Any] = [text(x) for x in array.reshape(-1).tolist()]
    elif array.dtype.kind == "c":
        flat = [[_num(float(x.real)), _num(float(x.imag))] for x in array.reshape(-1).tolist()]
    elif array.dtype.kind == "b":
        flat = [bool(x) for x in array.reshape(-1).tolist()]
    elif array.dtype.kind in "iu":
        flat = [int(x) for x in array.reshape(-1).tolist()]
    else:
        flat = [_num(float(x)) for x in array.astype(np.float64).reshape(-1).tolist()]
    return _nest(flat, array.shape)


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def tensor_json(key: str, spec: TensorSpec) -> dict[str, Any]:
    return {
        "key": key,
        "dtype": spec.dtype_name,
        "shape": list(spec.shape),
        "nbytes": tensor_nbytes(spec),
        "partitions": [
            {
                "extents": [list(e) for e in part.extents],
                "spec": part.spec_string(spec.shape),
                "box": partition_text(part, spec.shape),
            }
            for part in spec.partitions
        ],
    }


def select_keys(reader: CheckpointReader, wanted: list[str]) -> list[str]:
    keys = reader.keys()
    if not wanted:
        return keys
    present = set(keys)
    missing = [k for k in wanted if k not in present]
    if missing:
        raise CliError(
            f"no tensor {missing[0]!r} in {reader.prefix} ({len(keys)} tensors; "
            "'anyckpt inspect PREFIX' lists them)",
            ExitCode.NOT_FOUND,
        )
    return list(dict.fromkeys(wanted))


async def load_meta(storage: Storage, prefix: str) -> MetaGraphInfo | None:
    """The checkpoint's ``.meta`` graph (written by TF's Saver), or None if it has none."""
    try:
        return await read_meta_file(storage, meta_path(prefix))
    except CheckpointNotFoundError:
        return None


def meta_lines(info: MetaGraphInfo, keys: set[str] | None = None) -> list[str]:
    """Text for the ``.meta`` graph: its SaverDef, variables (those restored from ``keys``,
    when given) and collections."""
    saver = info.saver
    head = f"meta graph: {info.num_nodes} nodes"
    if info.tensorflow_version or info.meta_graph_version:
        head += f", written by {info.tensorflow_version or info.meta_graph_version}"
    lines = [head]
    if saver is not None:
        lines.append(
            f"  saver: version V{saver.version}, max_to_keep {saver.max_to_keep}, "
            f"keep_checkpoint_every_n_hours {saver.keep_checkpoint_every_n_hours}, "
            f"sharded {saver.sharded}, restore op {saver.restore_op_name}"
        )
    rows = [["VARIABLE", "DTYPE", "SHAPE", "CHECKPOINT KEY", "SLICE"]]
    for var in info.variables:
        if keys is not None and var.checkpoint_key not in keys:
            continue
        shape = "?" if var.shape is None else shape_text(var.shape)
        rows.append(
            [var.name, tf_name(var.dtype_enum), shape, var.checkpoint_key or "", var.slice_spec]
        )
    lines.append(table(rows, indent="  "))
    if info.collections:
        names = ", ".join(f"{k} ({len(v)})" for k, v in sorted(info.collections.items()))
        lines.append(f"  collections: {names}")
    return lines


def tensor_row(key: str, spec: TensorSpec) -> list[str]:
    """One tensor's cells in the text listing."""
    parts = spec.partitions
    return [
        key,
        spec.dtype_name,
        shape_text(spec.shape),
        format_bytes(tensor_nbytes(spec)),
        f"{len(parts)}: " + " ".join(partition_text(p, spec.shape) for p in parts) if parts else "",
    ]


#: Rows of the text listing printed at a time.
_ROWS_AT_ONCE = 4096


def _line(cells: list[str], widths: list[int]) -> str:
    """A row as :func:`~._output.table` lays it out (the size column aligned right)."""
    pairs = enumerate(zip(cells, widths, strict=True))
    laid = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in pairs]
    return ("  " + "  ".join(laid)).rstrip()


_HEADER = ["TENSOR", "DTYPE", "SHAPE", "SIZE", "PARTITIONS"]


def measure_tensor_table(reader: CheckpointReader, keys: list[str]) -> tuple[list[int], int]:
    """The listing's column widths and the tensors' total bytes, in one pass over the specs
    (none kept)."""
    widths = [len(cell) for cell in _HEADER]
    total = 0
    for key in keys:
        spec = reader.spec(key)
        total += tensor_nbytes(spec)
        for i, cell in enumerate(tensor_row(key, spec)):
            widths[i] = max(widths[i], len(cell))
    return widths, total


def echo_tensor_table(
    ctx: Context, reader: CheckpointReader, keys: list[str], widths: list[int]
) -> None:
    """The tensor listing, streamed a few thousand rows at a time (no spec, row or line of a
    million tensors held at once)."""
    lines = [_line(_HEADER, widths)]
    for key in keys:
        lines.append(_line(tensor_row(key, reader.spec(key)), widths))
        if len(lines) >= _ROWS_AT_ONCE:
            ctx.echo("\n".join(lines))
            lines = []
    if lines:
        ctx.echo("\n".join(lines))


async def run(ctx: Context, args: argparse.Namespace) -> int:
    ckpt = await find_checkpoint(ctx, args.prefix)
    meta = await load_meta(ckpt.storage, ckpt.path)
    reader = await ckpt.format.open(ckpt.storage, ckpt.path)
    try:
        keys = select_keys(reader, args.key)
        paths = reader.files()
        sizes = await anyio.to_thread.run_sync(file_sizes, ckpt.storage, paths)
        if not ctx.json and not args.values:
            # The listing alone: streamed from the reader, one spec at a time.
            widths, total_bytes = measure_tensor_table(reader, keys)
            shown = "" if not args.key else f" (of {len(reader.keys())})"
            echo_summary(
                ctx, ckpt.url, ckpt.format.name, paths, sizes, len(keys), shown, total_bytes
            )
            echo_tensor_table(ctx, reader, keys, widths)
            if meta is not None:
                ctx.echo()
                for line in meta_lines(meta, set(keys) if args.key else None):
                    ctx.echo(line)
            return ExitCode.OK
        specs = {k: reader.spec(k) for k in keys}
        values: dict[str, np.ndarray] = {}
        if args.values:
            total = sum(tensor_nbytes(s) for s in specs.values())
            with ctx.progress_bar("reading", total) as bar:
                for key in keys:
                    values[key] = await reader.read(key)
                    bar.advance(tensor_nbytes(specs[key]))
        shown = "" if not args.key else f" (of {len(reader.keys())})"
    finally:
        await reader.aclose()

    if ctx.json:
        tensors = []
        for key in keys:
            entry = tensor_json(key, specs[key])
            if key in values:
                entry["values"] = jsonable(values[key])
            tensors.append(entry)
        print_json(
            {
                "prefix": ckpt.url,
                "format": ckpt.format.name,
                "files": [
                    {"path": ckpt.storage.url(p), "size": s}
                    for p, s in zip(paths, sizes, strict=True)
                ],
                "tensors": tensors,
                "meta_graph": None if meta is None else meta.to_dict(),
            },
            ctx.out,
        )
        return ExitCode.OK

    total_bytes = sum(tensor_nbytes(s) for s in specs.values())
    echo_summary(ctx, ckpt.url, ckpt.format.name, paths, sizes, len(keys), shown, total_bytes)
    rows = [_HEADER, *(tensor_row(key, specs[key]) for key in keys)]
    ctx.echo(table(rows, right=(3,), indent="  "))
    if meta is not None:
        ctx.echo()
        for line in meta_lines(meta, set(keys) if args.key else None):
            ctx.echo(line)
    if values:
        with np.printoptions(threshold=200, edgeitems=3, linewidth=100):
            for key in keys:
                ctx.echo()
                head = f"{key} = "
                ctx.echo(head + np.array2string(values[key], separator=", ", prefix=head))
    return ExitCode.OK


def echo_summary(
    ctx: Context,
    url: str,
    format_name: str,
    paths: list[str],
    sizes: list[int | None],
    count: int,
    shown: str,
    total_bytes: int,
) -> None:
    """The first lines: the checkpoint, its format, files and totals, then a blank line."""
    ctx.echo(
        f"{url}: format {format_name}, {len(paths)} files, "
        f"{count} tensors{shown}, {format_bytes(total_bytes)}"
    )
    rows = [[posixpath.basename(p), format_bytes(s)] for p, s in zip(paths, sizes, strict=True)]
    ctx.echo(table([["FILE", "SIZE"], *rows], right=(1,), indent="  "))
    ctx.echo()

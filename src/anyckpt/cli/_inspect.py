"""``anyckpt inspect PREFIX``: format, files, and every tensor's dtype, shape, size, partitions."""

from __future__ import annotations

import argparse
import base64
import itertools
import math
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import anyio.to_thread
import numpy as np

from ..api import read_meta_file
from ..codecs.dtypes import tf_name
from ..errors import CheckpointNotFoundError
from ..formats.base import CheckpointReader, TensorSlice, TensorSpec, key_view
from ..formats.layout import meta_path
from ..meta import MetaGraphInfo
from ..object_graph import OBJECT_GRAPH_KEY
from ..storage import Storage
from ._common import (
    Context,
    ExitCode,
    add_no_verify,
    file_entry,
    file_sizes,
    find_checkpoint,
    select_keys,
    shape_text,
    stored_nbytes,
    tensor_nbytes,
)
from ._output import (
    display_width,
    format_bytes,
    format_ratio,
    pad,
    plural,
    print_json,
    table,
    truncate,
)
from ._tf2 import graph_json, graph_lines, read_graph


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
        help="only this tensor, or those matching this glob, e.g. 'encoder/*' (repeatable)",
    )
    add_no_verify(p, "with --values")
    p.set_defaults(run=run)


def partition_text(part: TensorSlice, shape: tuple[int, ...]) -> str:
    """NumPy-style box of one stored slice: ``[0:4, :]``."""
    cells = []
    for (start, stop), (_, length), dim in zip(part.box(shape), part.extents, shape, strict=True):
        cells.append(":" if length == -1 or (start == 0 and stop == dim) else f"{start}:{stop}")
    return "[" + ", ".join(cells) + "]"


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
        "stored_nbytes": stored_nbytes(spec),
        "partitions": [
            {
                "extents": [list(e) for e in part.extents],
                "spec": part.spec_string(spec.shape),
                "box": partition_text(part, spec.shape),
            }
            for part in spec.partitions
        ],
    }


def parameter_count(specs: dict[str, TensorSpec]) -> int:
    """Elements of the numeric tensors (what TensorFlow's inspect_checkpoint totals)."""
    return sum(spec.size for spec in specs.values() if spec.dtype.kind != "O")


def reader_metadata(reader: CheckpointReader) -> dict[str, str] | None:
    """A format's free-form metadata (safetensors' ``__metadata__``), when it has any."""
    metadata = getattr(reader, "metadata", None)
    if isinstance(metadata, Mapping) and metadata:
        return {str(k): str(v) for k, v in metadata.items()}
    return None


#: Text values longer than this are cut in text output (``--json`` prints them whole).
MAX_TEXT = 80


def shown_values(array: np.ndarray) -> np.ndarray:
    """``array`` for printing: strings longer than :data:`MAX_TEXT` bytes cut, with ``...``."""
    if array.dtype != object:
        return array
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        data = bytes(item)
        flat_out[i] = data if len(data) <= MAX_TEXT else data[: MAX_TEXT - 3] + b"..."
    return out


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


async def run(ctx: Context, args: argparse.Namespace) -> int:
    ckpt = await find_checkpoint(ctx, args.prefix)
    meta = await load_meta(ckpt.storage, ckpt.path)
    reader = await ckpt.format.open(ckpt.storage, ckpt.path)
    try:
        all_keys = key_view(reader)  # V2: no list of every name (a listing of 10^6)
        keys = select_keys(all_keys, args.key, where=reader.prefix)
        paths = reader.files()
        metadata = reader_metadata(reader)
        sizes = await anyio.to_thread.run_sync(file_sizes, ckpt.storage, paths)
        # TF2: decoded, never raw bytes
        layout, _, graph_problem = await read_graph(reader, all_keys)
        graph_specs = {k: reader.spec(k) for k in layout.checkpoint_keys()} if layout else {}
        if not args.values:
            # The listing streamed: specs made per row, twice, never all at once.
            listing = _Listing(reader.spec, keys)
            if ctx.json:
                document = _document(ckpt, paths, sizes, metadata, listing, meta)
                entries = (tensor_json(key, reader.spec(key)) for key in keys)
                _print_document(ctx, document, entries, layout, graph_specs, graph_problem)
                return ExitCode.OK
            _print_text(ctx, args, ckpt, all_keys, keys, paths, sizes, metadata, listing)
            _print_graphs(ctx, args, meta, keys, layout, graph_specs, graph_problem)
            return ExitCode.OK
        specs = {k: reader.spec(k) for k in keys}
        values: dict[str, np.ndarray] = {}
        if args.values:
            total = sum(tensor_nbytes(s) for s in specs.values())
            with ctx.progress_bar("reading", total) as bar:
                for key in keys:
                    values[key] = await reader.read(key, verify=not args.no_verify)
                    bar.advance(tensor_nbytes(specs[key]))
    finally:
        await reader.aclose()

    if ctx.json:

        def with_values(key: str) -> dict[str, Any]:
            entry = tensor_json(key, specs[key])
            if key in values and not (key == OBJECT_GRAPH_KEY and layout):
                entry["values"] = jsonable(values[key])
            return entry

        document = _document(ckpt, paths, sizes, metadata, _Listing(specs.__getitem__, keys), meta)
        entries = (with_values(key) for key in keys)
        _print_document(ctx, document, entries, layout, graph_specs, graph_problem)
        return ExitCode.OK

    _print_text(
        ctx, args, ckpt, all_keys, keys, paths, sizes, metadata, _Listing(specs.__getitem__, keys)
    )
    _print_graphs(ctx, args, meta, keys, layout, graph_specs, graph_problem)
    if layout is not None:
        values.pop(OBJECT_GRAPH_KEY, None)  # shown decoded above
    if values:
        cut = False
        with np.printoptions(threshold=200, edgeitems=3, linewidth=100):
            for key in keys:
                if key not in values:
                    continue
                ctx.echo()
                head_text = f"{key} = "
                display = shown_values(values[key])
                cut = cut or (
                    display is not values[key]
                    and any(len(bytes(x)) > MAX_TEXT for x in values[key].reshape(-1))
                )
                ctx.echo(head_text + np.array2string(display, separator=", ", prefix=head_text))
        if cut:
            ctx.echo()
            ctx.echo(f"(strings longer than {MAX_TEXT} bytes are cut; --json prints them whole)")
    return ExitCode.OK


def _document(
    ckpt: Any,
    paths: list[str],
    sizes: list[int | None],
    metadata: dict[str, str] | None,
    listing: _Listing,
    meta: MetaGraphInfo | None,
) -> dict[str, Any]:
    """The ``--json`` document but its tensors (streamed after it, in the key ``"tensors"``)."""
    return {
        "prefix": ckpt.url,
        "format": ckpt.format.name,
        "files": [file_entry(ckpt.storage, p, s) for p, s in zip(paths, sizes, strict=True)],
        "parameters": listing.params,
        "nbytes": listing.data_bytes,
        "stored_nbytes": listing.stored_bytes,
        "metadata": metadata,
        "tensors": [],
        "meta_graph": None if meta is None else meta.to_dict(),
    }


def _print_document(
    ctx: Context,
    document: dict[str, Any],
    entries: Iterable[dict[str, Any]],
    layout: Any,
    graph_specs: dict[str, TensorSpec],
    graph_problem: str | None,
) -> None:
    """``inspect --json``: the tensors written one entry at a time, as they are made."""
    if layout:
        document["object_graph"] = graph_json(layout, graph_specs)
    if graph_problem:
        document["object_graph_error"] = graph_problem
    print_json(document, ctx.out, streamed=("tensors", entries))


def _print_text(
    ctx: Context,
    args: argparse.Namespace,
    ckpt: Any,
    all_keys: Sequence[str],
    keys: Sequence[str],
    paths: list[str],
    sizes: list[int | None],
    metadata: dict[str, str] | None,
    listing: _Listing,
) -> None:
    """The header line, files, metadata and the tensor listing (streamed, line by line)."""
    params = listing.params
    shown = "" if not args.key else f" (of {len(all_keys)})"
    ctx.echo(
        f"{ckpt.url}: format {ckpt.format.name}, {plural(len(paths), 'file')}, "
        f"{plural(len(keys), 'tensor')}{shown}, {params:,} parameter{'' if params == 1 else 's'}, "
        f"{format_ratio(listing.data_bytes, listing.stored_bytes)}"
    )
    rows = [[posixpath.basename(p), format_bytes(s)] for p, s in zip(paths, sizes, strict=True)]
    ctx.echo(table([["FILE", "SIZE"], *rows], right=(1,), indent="  "))
    if metadata:
        ctx.echo()
        ctx.echo("metadata:")
        rows = [[k, truncate(v, MAX_TEXT)] for k, v in metadata.items()]
        ctx.echo(table(rows, indent="  "))
    ctx.echo()
    for line in listing.lines("  "):
        ctx.echo(line)


def _print_graphs(
    ctx: Context,
    args: argparse.Namespace,
    meta: MetaGraphInfo | None,
    keys: Sequence[str],
    layout: Any,
    graph_specs: dict[str, TensorSpec],
    graph_problem: str | None,
) -> None:
    if meta is not None:
        ctx.echo()
        for line in meta_lines(meta, set(keys) if args.key else None):
            ctx.echo(line)
    if layout is not None or graph_problem:
        ctx.echo()
        for line in graph_lines(layout, graph_specs) if layout else [graph_problem or ""]:
            ctx.echo(line)


class _Listing:
    """The rows of the tensor listing, made one spec at a time: a first pass sums what the
    header line says and measures the columns, a second makes each row again as it is
    printed (``specs``: already made, for ``--values``)."""

    def __init__(self, spec_of: Callable[[str], TensorSpec], keys: Sequence[str]) -> None:
        self.keys = keys
        self._spec = spec_of
        self.params = self.data_bytes = 0
        stored_total: int | None = 0
        self.compressed = False
        for key in keys:
            spec = self._spec(key)
            size = tensor_nbytes(spec)
            self.data_bytes += size
            if spec.dtype.kind != "O":
                self.params += spec.size
            stored = stored_nbytes(spec)
            if stored is None:
                stored_total = None
            else:
                self.compressed = self.compressed or stored != size
                if stored_total is not None:
                    stored_total += stored
        self.stored_bytes = stored_total
        self.head = ["TENSOR", "DTYPE", "SHAPE", "SIZE"]
        self.head += [*(["STORED"] if self.compressed else []), "PARTITIONS"]
        self.widths = [display_width(cell) for cell in self.head]
        for row in self.rows():
            self.widths = [max(w, display_width(c)) for w, c in zip(self.widths, row, strict=True)]

    def rows(self) -> Iterator[list[str]]:
        for key in self.keys:
            spec = self._spec(key)
            parts = spec.partitions
            yield [
                key,
                spec.dtype_name,
                shape_text(spec.shape),
                format_bytes(tensor_nbytes(spec)),
                *([format_bytes(stored_nbytes(spec))] if self.compressed else []),
                f"{len(parts)}: " + " ".join(partition_text(p, spec.shape) for p in parts)
                if parts
                else "",
            ]

    def lines(self, indent: str) -> Iterator[str]:
        """The listing as :func:`~._output.table` would align it, one line at a time."""
        right = (3, 4) if self.compressed else (3,)
        for row in itertools.chain([self.head], self.rows()):
            cells = [pad(c, self.widths[i], right=i in right) for i, c in enumerate(row)]
            yield (indent + "  ".join(cells)).rstrip()

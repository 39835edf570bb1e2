"""``anyckpt diff A B``: which tensors differ between two checkpoints, and by how much."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..object_graph import OBJECT_GRAPH_KEY
from ._common import (
    Context,
    ExitCode,
    add_no_verify,
    find_checkpoint,
    shape_text,
    tensor_nbytes,
)
from ._output import plural, print_json, table
from ._tf2 import graph_difference, read_graph


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "diff",
        parents=[common],
        help="compare the tensors of two checkpoints",
        description="Compare two checkpoints (any formats) tensor by tensor: names only in one, "
        "dtype or shape changes, and for numeric tensors the largest absolute difference. "
        "Exits 0 if they hold the same tensors bit for bit (or within --atol), 1 otherwise.",
    )
    p.add_argument("a", metavar="A", help="checkpoint prefix (or directory: its latest)")
    p.add_argument("b", metavar="B", help="checkpoint prefix (or directory: its latest)")
    p.add_argument(
        "--atol",
        type=_tolerance,
        default=0.0,
        help="absolute tolerance: elements with |a-b| <= atol + rtol*|b| are equal (default 0)",
    )
    p.add_argument(
        "--rtol",
        type=_tolerance,
        default=0.0,
        help="relative tolerance, as in numpy.isclose (default 0)",
    )
    add_no_verify(p, "of A and B")
    p.set_defaults(run=run)


def _tolerance(text: str) -> float:
    """A tolerance: a finite number >= 0 (argparse reports anything else as a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance is a finite number >= 0")
    return value


@dataclass
class Difference:
    key: str
    kind: str  # only-a, only-b, dtype, shape, values, object-graph
    detail: str
    max_abs_diff: float | None = None
    differing: int | None = None


def compare(
    key: str, a: np.ndarray, b: np.ndarray, atol: float, rtol: float = 0.0
) -> Difference | None:
    """How ``a`` and ``b`` differ, or None if they are equal (bit for bit, or every element
    within ``atol + rtol * |b|``, as :func:`numpy.isclose`)."""
    if a.dtype != b.dtype and (a.dtype == object or b.dtype == object):
        return Difference(key, "dtype", f"dtype {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return Difference(key, "shape", f"shape {shape_text(a.shape)} vs {shape_text(b.shape)}")
    if a.dtype == object:
        unequal = sum(x != y for x, y in zip(a.reshape(-1), b.reshape(-1), strict=True))
        if not unequal:
            return None
        return Difference(key, "values", f"{unequal} of {a.size} strings differ", None, unequal)
    same_dtype = a.dtype == b.dtype
    if same_dtype and a.tobytes() == b.tobytes():
        return None
    wide = np.complex128 if "c" in (a.dtype.kind, b.dtype.kind) else np.float64
    x, y = a.astype(wide), b.astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.abs(x - y)
    both_nan = np.isnan(x) & np.isnan(y)
    delta = np.where(both_nan, 0.0, delta)
    nan_mismatch = bool(np.any(np.isnan(delta)))
    delta = np.where(np.isnan(delta), np.inf, delta)
    max_diff = float(delta.max()) if delta.size else 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        allowed = atol + rtol * np.abs(y)
    differing = int(np.count_nonzero(~(delta <= allowed)))
    tolerant = atol > 0 or rtol > 0
    if same_dtype and tolerant and differing == 0 and not nan_mismatch:
        return None
    if not same_dtype:
        detail = f"dtype {a.dtype} vs {b.dtype}, max |a-b| {max_diff:.6g}"
        return Difference(key, "dtype", detail, max_diff, differing)
    if differing == 0 and not tolerant:
        detail = "bits differ (-0.0 vs 0.0 or NaN payloads), max |a-b| 0"
        return Difference(key, "values", detail, 0.0, 0)
    detail = f"max |a-b| {max_diff:.6g}, {differing} of {a.size} elements differ"
    return Difference(key, "values", detail, max_diff, differing)


async def run(ctx: Context, args: argparse.Namespace) -> int:
    ckpt_a = await find_checkpoint(ctx, args.a)
    ckpt_b = await find_checkpoint(ctx, args.b)
    reader_a = await ckpt_a.format.open(ckpt_a.storage, ckpt_a.path)
    try:
        reader_b = await ckpt_b.format.open(ckpt_b.storage, ckpt_b.path)
        try:
            keys_a, keys_b = reader_a.keys(), reader_b.keys()
            set_a, set_b = set(keys_a), set(keys_b)
            common = [k for k in keys_a if k in set_b]
            diffs: list[Difference] = [
                *(Difference(k, "only-a", "only in A") for k in keys_a if k not in set_b),
                *(Difference(k, "only-b", "only in B") for k in keys_b if k not in set_a),
            ]
            total = sum(
                tensor_nbytes(reader_a.spec(k)) + tensor_nbytes(reader_b.spec(k)) for k in common
            )
            with ctx.progress_bar("comparing", total) as bar:
                for key in common:
                    spec_a, spec_b = reader_a.spec(key), reader_b.spec(key)
                    if spec_a.shape != spec_b.shape:
                        diffs.append(
                            Difference(
                                key,
                                "shape",
                                f"shape {shape_text(spec_a.shape)} vs {shape_text(spec_b.shape)}",
                            )
                        )
                    else:
                        verify = not args.no_verify
                        found = compare(
                            key,
                            await reader_a.read(key, verify=verify),
                            await reader_b.read(key, verify=verify),
                            args.atol,
                            args.rtol,
                        )
                        if found is not None:
                            diffs.append(found)
                    bar.advance(tensor_nbytes(spec_a) + tensor_nbytes(spec_b))
            for d in diffs:  # TF2 object graphs: say which objects differ, not "1 string"
                if d.key == OBJECT_GRAPH_KEY and d.kind == "values":
                    layout_a, _, _ = await read_graph(reader_a)
                    layout_b, _, _ = await read_graph(reader_b)
                    d.kind, d.detail = "object-graph", graph_difference(layout_a, layout_b)
        finally:
            await reader_b.aclose()
    finally:
        await reader_a.aclose()

    order = {k: i for i, k in enumerate(sorted(set_a | set_b))}
    diffs.sort(key=lambda d: order[d.key])
    if ctx.json:
        print_json(
            {
                "a": ckpt_a.url,
                "b": ckpt_b.url,
                "equal": not diffs,
                "compared": len(common),
                "atol": args.atol,
                "rtol": args.rtol,
                "differences": [
                    {
                        "key": d.key,
                        "kind": d.kind,
                        "detail": d.detail,
                        "max_abs_diff": d.max_abs_diff,
                        "differing_elements": d.differing,
                    }
                    for d in diffs
                ],
            },
            ctx.out,
        )
    else:
        ctx.echo(f"A: {ckpt_a.url}")
        ctx.echo(f"B: {ckpt_b.url}")
        if diffs:
            rows = [["TENSOR", "DIFFERENCE"], *([d.key, d.detail] for d in diffs)]
            ctx.echo(table(rows, indent="  "))
        same = len(common) - sum(
            d.kind in ("values", "dtype", "shape", "object-graph") for d in diffs
        )
        within = [f"{name} {value:g}" for name, value in (("atol", args.atol), ("rtol", args.rtol))]
        tolerance = [w for w, v in zip(within, (args.atol, args.rtol), strict=True) if v]
        ctx.echo(
            f"{plural(len(diffs), 'difference')}; {same} of {plural(len(common), 'tensor')} in "
            "both are identical" + (f" (within {', '.join(tolerance)})" if tolerance else "")
        )
    return ExitCode.DAMAGE if diffs else ExitCode.OK

"""The metrics sidecar of a checkpoint (``PREFIX.metrics.json``: its name is
:func:`anyckpt.formats.layout.metrics_path`'s), sans I/O.

A small JSON object ``{"step": 5, "metrics": {"loss": 0.3}}``. Values are numbers; a
non-finite value (a diverged loss) is stored as ``null`` (strict JSON) and reads back as NaN,
which retention never counts among the best. When the saved state was a structure flat names
cannot give back (lists, tuples, ``None``, integer keys: :func:`anyckpt.tree.needs_tree`), the
sidecar also holds its description under ``"tree"`` (:func:`anyckpt.tree.flatten_tree`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from . import DecodeError

__all__ = [
    "MAX_METRICS_SIZE",
    "decode_metrics",
    "decode_tree",
    "encode_metrics",
]

#: A sidecar larger than this is refused (a few numbers, and the description of a structure:
#: ~100 bytes per tensor).
MAX_METRICS_SIZE = 16 << 20


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` as a plain dict of floats.

    Raises:
        TypeError: if a name is not a non-empty string or a value is not a real number.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {metrics!r}")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"a metric name must be a non-empty string, got {name!r}")
        try:
            if isinstance(value, (bool, str, bytes)):
                raise TypeError
            out[name] = float(value)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"metric {name!r} must be a real number, got {value!r}") from None
    return out


def encode_metrics(step: int, metrics: Mapping[str, float], tree: object = None) -> bytes:
    """The sidecar's bytes for ``metrics`` (checked as :func:`check_metrics` does) and, if
    given, the JSON-able description of the saved structure."""
    values = {k: (v if math.isfinite(v) else None) for k, v in check_metrics(metrics).items()}
    doc: dict[str, object] = {"step": int(step), "metrics": values}
    if tree is not None:
        doc["tree"] = tree
    return (json.dumps(doc, sort_keys=True, allow_nan=False) + "\n").encode()


def _decode(data: bytes) -> object:
    if len(data) > MAX_METRICS_SIZE:
        raise DecodeError(f"metrics file of {len(data)} bytes is too large")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError(f"metrics file is not JSON: {exc}") from None


def decode_tree(data: bytes) -> object:
    """The structure description of a sidecar (None if it records none; checked when used).

    Raises:
        DecodeError: if it is not a JSON object.
    """
    doc = _decode(data)
    if not isinstance(doc, dict):
        raise DecodeError("metrics file is not a JSON object")
    return doc.get("tree")


def decode_metrics(data: bytes) -> dict[str, float]:
    """The metrics of a sidecar.

    Raises:
        DecodeError: if it is not such a JSON object.
    """
    doc = _decode(data)
    values = doc.get("metrics") if isinstance(doc, dict) else None
    if not isinstance(values, dict):
        raise DecodeError("metrics file has no 'metrics' object")
    out: dict[str, float] = {}
    for name, value in values.items():
        if value is None:
            out[name] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out[name] = float(value)
            except OverflowError:
                raise DecodeError(f"metric {name!r} is out of range") from None
        else:
            raise DecodeError(f"metric {name!r} is not a number: {value!r}")
    return out


def _refuse(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")

"""The benchmark workloads: deterministic model states built from NumPy (and ml_dtypes) only.

Every tool (anyckpt, the limits, each peer in its own virtual environment) builds the same state
from this module, so they all write and read the same bytes. ``scale`` multiplies the size:
1.0 is the default for this 2-core, 24 GiB machine; the CI smoke run uses a tiny scale.

* ``large``: 64 float32 tensors of 16 MiB (1 GiB);
* ``many_small``: 10,000 float32 tensors of 256 elements, named like a real model's variables;
* ``mixed``: a transformer-like state: bfloat16 weights, float32 Adam slots (m, v) for each,
  int64 step counters, a few string tensors (a vocabulary, a config, a version tag).

Values are real (no zero pages: a freshly mapped zero page is free to read and would flatter
copies), cheap to make and the same on every call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np

try:  # bfloat16; every environment that runs the benchmark has ml_dtypes
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

WORKLOADS = ("large", "many_small", "mixed")

State = dict[str, np.ndarray]


def _fill(n: int, seed: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """``n`` distinct, non-zero values of ``dtype``; deterministic and fast (no RNG)."""
    base = np.arange(n, dtype=np.float32)
    base *= np.float32(1e-3)
    base += np.float32(seed % 997 + 1)
    return base if np.dtype(dtype) == np.float32 else base.astype(dtype)


def large(scale: float = 1.0) -> State:
    """64 float32 tensors of 16 MiB × scale each."""
    n = max(1, int((16 << 20) * scale) // 4)
    return {f"model/block_{i:02d}/dense/kernel": _fill(n, i) for i in range(64)}


def many_small(scale: float = 1.0) -> State:
    """10,000 × scale float32 tensors of 256 elements, with names like a deep model's."""
    count = max(10, int(10_000 * scale))
    kinds = ("attention/query", "attention/key", "attention/value", "attention/output", "mlp/in")
    parts = ("kernel", "bias")
    out: State = {}
    for i in range(count):
        layer, rest = divmod(i, len(kinds) * len(parts) * 20)
        head, rest = divmod(rest, len(kinds) * len(parts))
        kind, part = divmod(rest, len(parts))
        name = f"encoder/layer_{layer:03d}/head_{head:02d}/{kinds[kind]}/{parts[part]}"
        out[name] = _fill(256, i)
    return out


def _mixed_dims(scale: float) -> tuple[int, int, int]:
    """(layers, width, vocabulary) for a mixed state of about 550 MiB × scale."""
    root = math.sqrt(scale)
    width = max(8, round(768 * root / 8) * 8)
    vocab = max(16, round(16_384 * root))
    layers = 6
    return layers, width, vocab


def mixed(scale: float = 1.0) -> State:
    """A transformer-like training state with its optimizer slots, counters and strings."""
    if BFLOAT16 is None:  # pragma: no cover
        raise RuntimeError("the mixed workload needs ml_dtypes (bfloat16)")
    layers, d, vocab = _mixed_dims(scale)
    weights: dict[str, tuple[int, ...]] = {"model/embedding/table": (vocab, d)}
    for i in range(layers):
        p = f"model/layer_{i:02d}"
        for name in ("query", "key", "value", "output"):
            weights[f"{p}/attention/{name}/kernel"] = (d, d)
            weights[f"{p}/attention/{name}/bias"] = (d,)
        weights[f"{p}/mlp/in/kernel"] = (d, 4 * d)
        weights[f"{p}/mlp/in/bias"] = (4 * d,)
        weights[f"{p}/mlp/out/kernel"] = (4 * d, d)
        weights[f"{p}/mlp/out/bias"] = (d,)
        for norm in ("norm_1", "norm_2"):
            weights[f"{p}/{norm}/scale"] = (d,)
            weights[f"{p}/{norm}/offset"] = (d,)
    weights["model/final_norm/scale"] = (d,)
    out: State = {}
    for seed, (name, shape) in enumerate(weights.items()):
        n = math.prod(shape)
        out[name] = _fill(n, seed, BFLOAT16).reshape(shape)
        out[f"optimizer/m/{name}"] = _fill(n, seed + 1).reshape(shape)
        out[f"optimizer/v/{name}"] = _fill(n, seed + 2).reshape(shape)
    out["optimizer/iterations"] = np.array(123_456, dtype=np.int64)
    out["global_step"] = np.array(123_456, dtype=np.int64)
    out["data/epoch_and_position"] = np.array([3, 98_765_432], dtype=np.int64)
    out["model/vocabulary"] = _strings([f"token_{i}".encode() for i in range(vocab)])
    config = {"layers": layers, "width": d, "vocab": vocab, "dtype": "bfloat16"}
    out["meta/config_json"] = _strings([json.dumps(config).encode()]).reshape(())
    out["meta/version"] = _strings([b"anyckpt-bench 1"]).reshape(())
    return out


def _strings(values: list[bytes]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


BUILDERS: dict[str, Callable[[float], State]] = {
    "large": large,
    "many_small": many_small,
    "mixed": mixed,
}


def build(name: str, scale: float = 1.0) -> State:
    return BUILDERS[name](scale)


def is_string(array: np.ndarray) -> bool:
    return array.dtype == object


def nbytes(state: State) -> int:
    """Payload bytes: numeric tensor bytes plus the bytes of every string element."""
    total = 0
    for array in state.values():
        if is_string(array):
            total += sum(len(v) for v in array.reshape(-1).tolist())
        else:
            total += array.nbytes
    return total


def numeric_nbytes(state: State) -> int:
    return sum(a.nbytes for a in state.values() if not is_string(a))


def describe(state: State) -> dict[str, object]:
    """What every tool's process is told about a workload: names, the 1% subset, TF dtype
    names, shapes, and payload bytes (all, numeric only, and of the subset)."""
    subset = subset_keys(state)
    part = {k: state[k] for k in subset}
    return {
        "keys": sorted(state),
        "subset": subset,
        "dtypes": {k: ("string" if is_string(v) else v.dtype.name) for k, v in state.items()},
        "shapes": {k: list(v.shape) for k, v in state.items()},
        "bytes": nbytes(state),
        "numeric_bytes": numeric_nbytes(state),
        "tensors": len(state),
        "subset_bytes": nbytes(part),
        "subset_numeric_bytes": numeric_nbytes(part),
    }


def subset_keys(state: State, fraction: float = 0.01) -> list[str]:
    """About ``fraction`` of the keys, spread evenly over the sorted names (at least one)."""
    keys = sorted(state)
    step = max(1, round(1 / fraction))
    return keys[::step] if len(keys) >= step else keys[:1]

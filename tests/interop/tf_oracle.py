"""Real TensorFlow as a test oracle, run in a subprocess from the TF venv.

Usage: ``$ANYCKPT_TF_PYTHON tests/interop/tf_oracle.py <command> ...``. Each command prints one
JSON object on stdout (``{"error": ...}`` and exit status 1 on failure; TF's own chatter goes to
stderr). Commands:

  save-v1graph OUT_PREFIX IN.npz [OUT_PREFIX IN.npz ...]
               [--sharded-devices JSON] [--global-step N] [--version V1|V2]
      One graph-mode ``tf.compat.v1.train.Saver`` save per pair (parent directory created),
      made as the fixtures README describes. ``--sharded-devices`` maps key -> CPU index and
      saves with ``sharded=True``; keys not in it go to CPU 0.
      -> {"results": [{"prefix", "files"}]}
  read PREFIX OUT.npz [PREFIX OUT.npz ...]
      Every tensor via ``tf.train.load_checkpoint``.
      -> {"results": [{"prefix", "dtypes", "shapes", "errors"}]}
  restore PREFIX KEYS_JSON OUT.npz
      ``tf.raw_ops.RestoreV2`` per item; KEYS_JSON is a list of ``key`` or
      ``[key, shape_and_slice]`` or ``[key, shape_and_slice, dtype]``. OUT.npz keeps that order.
      -> {"results": [{"key", "slice", "dtype", "shape"} or {"key", "slice", "error"}]}
  state DIR
      -> {"state": CheckpointState fields or null, "latest": latest_checkpoint(DIR)}
  manager-save DIR STEPS_JSON --max-to-keep N|none [--keep-every-n-hours H] [--sleep S]
      A ``tf.train.CheckpointManager`` over ``tf.train.Checkpoint(v=int64 variable)``; saves
      each step as its checkpoint number with v = step.
      -> {"saved", "checkpoints", "state", "latest", "files"}
  coimport [--order tf-first|anyckpt-first] [--import MODULE ...] [--roundtrip DIR]
      Imports anyckpt (all of ``anyckpt._proto``) and TensorFlow in one process and exchanges
      serialized protos between them; ``--roundtrip`` also saves/loads with ``anyckpt.sync``.

Arrays travel in .npz files: entries ``t0, t1, ...`` and ``__meta__``, a JSON list of
``{"key", "dtype", "shape"}`` in the same order, where dtype is TF's name. bfloat16 (and any
other ml_dtypes type) travels as its raw unsigned-integer bits, strings as object arrays of bytes.
TensorFlow is imported only inside the commands, so tests import this module for the npz codec.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

_BITS_DTYPES = {  # ml_dtypes types -> the unsigned int their bits travel as
    "bfloat16": np.uint16,
    "float8_e4m3fn": np.uint8,
    "float8_e5m2": np.uint8,
}
META = "__meta__"


# --- npz codec (used on both sides) -----------------------------------------------------------


def encode_array(value: Any) -> tuple[str, np.ndarray]:
    """Return (TF dtype name, array to store) for one tensor value."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype.kind in "OS":
        out = np.empty(arr.shape, dtype=object)
        flat = out.reshape(-1)
        for i, item in enumerate(arr.reshape(-1)):
            if not isinstance(item, bytes):
                raise TypeError(f"string tensors must hold bytes, got {type(item).__name__}")
            flat[i] = bytes(item)
        return "string", out
    if arr.dtype.kind == "U":
        raise TypeError("str arrays are ambiguous; pass object arrays of bytes")
    name = arr.dtype.name
    if name in _BITS_DTYPES:
        return name, np.asarray(arr, order="C").view(_BITS_DTYPES[name])
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return name, np.asarray(arr, order="C")


def decode_array(tag: str, stored: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    if tag == "string":
        if stored.dtype != object:
            raise TypeError(f"string tensor stored as {stored.dtype}")
        return stored
    if tag in _BITS_DTYPES:
        return stored.view(getattr(ml_dtypes, tag))
    if stored.dtype.name != tag:
        raise TypeError(f"dtype tag {tag} but stored {stored.dtype}")
    return stored


def write_npz(path: str | os.PathLike[str], items: Iterable[tuple[str, Any]]) -> None:
    """Write (key, array) pairs, in order; keys may repeat and be any string."""
    meta: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for i, (key, value) in enumerate(items):
        tag, stored = encode_array(value)
        meta.append({"key": key, "dtype": tag, "shape": list(stored.shape)})
        arrays[f"t{i}"] = stored
    np.savez(path, allow_pickle=True, **{META: np.array(json.dumps(meta))}, **arrays)


def read_npz(path: str | os.PathLike[str]) -> list[tuple[str, np.ndarray]]:
    """Read the (key, array) pairs written by :func:`write_npz`."""
    with np.load(path, allow_pickle=True) as npz:
        meta = json.loads(str(npz[META]))
        return [(m["key"], decode_array(m["dtype"], npz[f"t{i}"])) for i, m in enumerate(meta)]


# --- commands (TF side) -----------------------------------------------------------------------


def _pairs(values: Sequence[str], what: str) -> list[tuple[str, str]]:
    if not values or len(values) % 2:
        raise SystemExit(f"expected {what} pairs, got {list(values)}")
    return list(zip(values[::2], values[1::2], strict=True))


def _files_of(prefix: str) -> list[str]:
    """Files of a checkpoint prefix; a V1 sharded prefix is a ``?????`` pattern."""
    directory, base = os.path.split(os.path.abspath(prefix))
    meta = base.split("-?????-of-")[0] + ".meta"
    return sorted(
        f for f in os.listdir(directory) if fnmatch.fnmatchcase(f, base + "*") or f == meta
    )


def _attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, str | None]:
    """(fn(...), None), or (None, "Type: message") if it raised."""
    try:
        return fn(*args, **kwargs), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _as_numpy(tf: Any, value: Any, dtype: Any) -> np.ndarray:
    if dtype == tf.string:
        return np.asarray(value, dtype=object)
    return np.asarray(value, dtype=dtype.as_numpy_dtype)


def cmd_save_v1graph(args: argparse.Namespace) -> dict[str, Any]:
    """Save each IN.npz with a graph-mode v1 Saver."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saver_pb2

    tf.compat.v1.disable_v2_behavior()
    version = {"V1": saver_pb2.SaverDef.V1, "V2": saver_pb2.SaverDef.V2}[args.version]
    devices: dict[str, int] | None = (
        json.loads(args.sharded_devices) if args.sharded_devices else None
    )
    results = []
    for out_prefix, in_npz in _pairs(args.pairs, "OUT_PREFIX IN.npz"):
        os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
        graph = tf.Graph()
        with graph.as_default():
            feeds, var_list, inits = {}, {}, []
            for i, (key, value) in enumerate(read_npz(in_npz)):
                tag, _ = encode_array(value)
                device = (
                    tf.device(f"/cpu:{devices.get(key, 0)}")
                    if devices is not None
                    else contextlib.nullcontext()
                )
                with device:
                    ph = tf.compat.v1.placeholder(tf.as_dtype(tag), shape=value.shape, name=f"p{i}")
                    var = tf.compat.v1.Variable(ph, name=f"v{i}")
                feeds[ph] = value
                var_list[key] = var
                inits.append(var.initializer)
            saver = tf.compat.v1.train.Saver(
                var_list=var_list,
                sharded=devices is not None,
                write_version=version,
                save_relative_paths=True,
            )
            config = None
            if devices is not None:
                config = tf.compat.v1.ConfigProto(
                    device_count={"CPU": max([0, *devices.values()]) + 1}
                )
            with tf.compat.v1.Session(graph=graph, config=config) as sess:
                sess.run(inits, feed_dict=feeds)
                path = saver.save(sess, out_prefix, global_step=args.global_step)
        results.append({"prefix": path, "files": _files_of(path)})
    return {"results": results}


def cmd_read(args: argparse.Namespace) -> dict[str, Any]:
    """Read every tensor with tf.train.load_checkpoint."""
    import tensorflow as tf

    results = []
    for prefix, out_npz in _pairs(args.pairs, "PREFIX OUT.npz"):
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        shapes = reader.get_variable_to_shape_map()
        items, errors = [], {}
        for key in sorted(dtypes):
            value, error = _attempt(reader.get_tensor, key)
            if error is None:
                items.append((key, _as_numpy(tf, value, dtypes[key])))
            else:
                errors[key] = error
        write_npz(out_npz, items)
        results.append(
            {
                "prefix": prefix,
                "dtypes": {k: d.name for k, d in dtypes.items()},
                "shapes": {k: list(s) for k, s in shapes.items()},
                "errors": errors,
            }
        )
    return {"results": results}


def cmd_restore(args: argparse.Namespace) -> dict[str, Any]:
    """Read with RestoreV2, one op per requested (key, slice)."""
    import tensorflow as tf

    requests = [[i] if isinstance(i, str) else list(i) for i in json.loads(args.keys_json)]
    dtypes = {}
    if any(len(r) < 3 for r in requests):
        dtypes = tf.train.load_checkpoint(args.prefix).get_variable_to_dtype_map()
    results: list[dict[str, Any]] = []
    items = []
    for spec in requests:
        key, slice_spec = spec[0], spec[1] if len(spec) > 1 else ""
        dtype = tf.as_dtype(spec[2]) if len(spec) > 2 else dtypes[key]
        tensors, error = _attempt(
            tf.raw_ops.RestoreV2,
            prefix=args.prefix,
            tensor_names=[key],
            shape_and_slices=[slice_spec],
            dtypes=[dtype],
        )
        if error is not None:
            results.append({"key": key, "slice": slice_spec, "error": error})
            continue
        value = _as_numpy(tf, tensors[0].numpy(), dtype)
        items.append((key, value))
        results.append(
            {"key": key, "slice": slice_spec, "dtype": dtype.name, "shape": list(value.shape)}
        )
    write_npz(args.out_npz, items)
    return {"results": results}


def _state(tf: Any, directory: str) -> dict[str, Any]:
    st = tf.train.get_checkpoint_state(directory)
    fields = None
    if st is not None:
        fields = {
            "model_checkpoint_path": st.model_checkpoint_path,
            "all_model_checkpoint_paths": list(st.all_model_checkpoint_paths),
            "all_model_checkpoint_timestamps": list(st.all_model_checkpoint_timestamps),
            "last_preserved_timestamp": st.last_preserved_timestamp,
        }
    return {"state": fields, "latest": tf.train.latest_checkpoint(directory)}


def cmd_state(args: argparse.Namespace) -> dict[str, Any]:
    """get_checkpoint_state and latest_checkpoint of DIR."""
    import tensorflow as tf

    return _state(tf, args.dir)


def cmd_manager_save(args: argparse.Namespace) -> dict[str, Any]:
    """Save with a real tf.train.CheckpointManager at the given checkpoint numbers."""
    import tensorflow as tf

    var = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(v=var)
    max_to_keep = None if args.max_to_keep.lower() == "none" else int(args.max_to_keep)
    mgr = tf.train.CheckpointManager(
        ckpt,
        args.dir,
        max_to_keep=max_to_keep,
        keep_checkpoint_every_n_hours=args.keep_every_n_hours,
    )
    saved = []
    for i, step in enumerate(json.loads(args.steps_json)):
        if i and args.sleep:
            time.sleep(args.sleep)
        var.assign(step)
        saved.append(mgr.save(checkpoint_number=step))
    return {
        "saved": saved,
        "checkpoints": list(mgr.checkpoints),
        **_state(tf, args.dir),
        "files": sorted(os.listdir(args.dir)),
    }


def _roundtrip(tf: Any, directory: Path) -> dict[str, Any]:
    """anyckpt.sync save -> TF read, and TF SaveV2 -> anyckpt.sync load, in this process."""
    import anyckpt.sync

    values = {
        "f32": np.array([[1.5, -0.0], [np.inf, np.nan]], dtype=np.float32),
        "bf16": np.array([1.0, -2.5, 3.0], dtype=ml_dtypes.bfloat16),
        "str": np.array([b"", b"\xff\x00x", b"abc" * 50], dtype=object),
        "scalar/i64": np.array(-(2**62), dtype=np.int64),
    }

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        if a.dtype == object or b.dtype == object:
            return a.dtype == b.dtype and a.shape == b.shape and a.tolist() == b.tolist()
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    ours = str(directory / "ours")
    anyckpt.sync.save(ours, values)
    reader = tf.train.load_checkpoint(ours)
    dtypes = reader.get_variable_to_dtype_map()
    tf_reads_ours = set(dtypes) == set(values) and all(
        same(_as_numpy(tf, reader.get_tensor(k), dtypes[k]), v) for k, v in values.items()
    )
    theirs = str(directory / "theirs")
    tf.raw_ops.SaveV2(
        prefix=theirs,
        tensor_names=list(values),
        shape_and_slices=[""] * len(values),
        tensors=[tf.constant(v) for v in values.values()],
    )
    loaded = anyckpt.sync.load(theirs)
    ours_reads_tf = set(loaded) == set(values) and all(
        same(np.asarray(loaded[k]), v) for k, v in values.items()
    )
    return {"tf_reads_ours": tf_reads_ours, "ours_reads_tf": ours_reads_tf}


def cmd_coimport(args: argparse.Namespace) -> dict[str, Any]:
    """Import anyckpt and TF in one process and exchange protos."""
    import pkgutil

    from google.protobuf import descriptor_pool, text_format

    first, second = (
        ("tensorflow", "anyckpt") if args.order == "tf-first" else ("anyckpt", "tensorflow")
    )
    importlib.import_module(first)
    importlib.import_module(second)
    import tensorflow as tf

    import anyckpt
    import anyckpt._proto

    imported = [
        importlib.import_module(f"anyckpt._proto.{m.name}").__name__
        for m in pkgutil.iter_modules(anyckpt._proto.__path__)
    ]
    imported += [importlib.import_module(name).__name__ for name in args.imports]

    from tensorflow.core.protobuf import tensor_bundle_pb2 as tf_bundle
    from tensorflow.python.training import checkpoint_state_pb2 as tf_state

    from anyckpt._proto import checkpoint_state_pb2 as our_state
    from anyckpt._proto import tensor_bundle_pb2 as our_bundle
    from anyckpt._proto import types_pb2 as our_types

    entry = our_bundle.BundleEntryProto(
        dtype=our_types.DT_BFLOAT16, shard_id=1, offset=17, size=6, crc32c=0xA282EAD8
    )
    entry.shape.dim.add(size=3)
    tf_entry = tf_bundle.BundleEntryProto.FromString(entry.SerializeToString())
    entry_ok = (
        (tf_entry.dtype, tf_entry.shard_id, tf_entry.offset, tf_entry.size, tf_entry.crc32c)
        == (14, 1, 17, 6, 0xA282EAD8)
        and [d.size for d in tf_entry.shape.dim] == [3]
        and our_bundle.BundleEntryProto.FromString(tf_entry.SerializeToString()) == entry
    )
    header = tf_bundle.BundleHeaderProto(num_shards=2)
    header.version.producer = 1
    our_header = our_bundle.BundleHeaderProto.FromString(header.SerializeToString())
    header_ok = our_header.num_shards == 2 and our_header.version.producer == 1
    text = 'model_checkpoint_path: "a-2"\nall_model_checkpoint_paths: "a-1"\n'
    state_ok = text_format.MessageToString(
        text_format.Parse(text, our_state.CheckpointState())
    ) == text_format.MessageToString(text_format.Parse(text, tf_state.CheckpointState()))
    pool = descriptor_pool.Default()
    out: dict[str, Any] = {
        "order": args.order,
        "tf_version": tf.__version__,
        "anyckpt_file": anyckpt.__file__,
        "imported": imported,
        "full_names": [
            pool.FindMessageTypeByName("anyckpt.tf.BundleEntryProto").full_name,
            pool.FindMessageTypeByName("tensorflow.BundleEntryProto").full_name,
        ],
        "entry_roundtrip": entry_ok,
        "header_roundtrip": header_ok,
        "state_text_roundtrip": state_ok,
    }
    if args.roundtrip:
        out["roundtrip"] = _roundtrip(tf, Path(args.roundtrip))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tf_oracle.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("save-v1graph")
    p.add_argument("pairs", nargs="+", metavar="OUT_PREFIX IN.npz")
    p.add_argument("--sharded-devices")
    p.add_argument("--global-step", type=int)
    p.add_argument("--version", choices=["V1", "V2"], default="V2")
    p.set_defaults(func=cmd_save_v1graph)
    p = sub.add_parser("read")
    p.add_argument("pairs", nargs="+", metavar="PREFIX OUT.npz")
    p.set_defaults(func=cmd_read)
    p = sub.add_parser("restore")
    p.add_argument("prefix")
    p.add_argument("keys_json")
    p.add_argument("out_npz")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("state")
    p.add_argument("dir")
    p.set_defaults(func=cmd_state)
    p = sub.add_parser("manager-save")
    p.add_argument("dir")
    p.add_argument("steps_json")
    p.add_argument("--max-to-keep", required=True)
    p.add_argument("--keep-every-n-hours", type=float)
    p.add_argument("--sleep", type=float, default=0.0)
    p.set_defaults(func=cmd_manager_save)
    p = sub.add_parser("coimport")
    p.add_argument("--order", choices=["tf-first", "anyckpt-first"], default="tf-first")
    p.add_argument("--import", dest="imports", action="append", default=[])
    p.add_argument("--roundtrip")
    p.set_defaults(func=cmd_coimport)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; JSON goes to the real stdout, everything else to stderr."""
    args = _parser().parse_args(argv)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything TF prints lands on stderr
    sys.stdout = sys.stderr
    try:
        result: Mapping[str, Any] = args.func(args)
        status = 0
    except Exception as e:
        traceback.print_exc()
        result, status = {"error": f"{type(e).__name__}: {e}"}, 1
    sys.stderr.flush()
    json.dump(result, out)
    out.write("\n")
    out.close()
    return status


if __name__ == "__main__":
    sys.exit(main())

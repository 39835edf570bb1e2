"""Write the TensorFlow-made checkpoint corpus the tests read (``tests/fixtures/tf-2.21``).

Run with a Python that has ``tensorflow-cpu==2.21.0`` (``make fixtures`` uses ``.venv-tf``)::

    .venv-tf/bin/python tools/tf/make_fixtures.py tests/fixtures/tf-2.21

Every case is written by real TensorFlow in a process of its own (graph-mode ``tf.compat.v1``
Saver cases need ``disable_v2_behavior()``, the TF2 case needs eager mode), then read back with
``tf.train.load_checkpoint`` (or ``RestoreV2`` where that reader refuses, recorded as
``read_via``) and compared bit for bit with the values that were saved. Only then is the case
folder replaced. Layout and manifest schema: the README.md this script writes beside the cases.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STRING_ENCODING = "object_bytes (np.load(..., allow_pickle=True))"
SAVER_KW = "write_version=saver_pb2.SaverDef.{v}, save_relative_paths=True"
#: What to do with one partitioned variable: (number of partitions, axis).
Part = tuple[int, int]


def strings(*items: bytes, shape: Sequence[int] | None = None) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out.reshape(tuple(shape) if shape is not None else (len(items),))


def pattern(n: int) -> bytes:
    """n bytes that are neither text nor constant: (7 i + 3) mod 256."""
    return bytes((7 * i + 3) % 256 for i in range(n))


def bf16(*values: float) -> np.ndarray:
    import ml_dtypes

    return np.array(values, dtype=ml_dtypes.bfloat16)


def bf16_bits(*bits: int) -> np.ndarray:
    import ml_dtypes

    return np.array(bits, dtype=np.uint16).view(ml_dtypes.bfloat16)


# -- the values ----------------------------------------------------------------------------------


@dataclass
class Var:
    """One checkpoint key: its value, and where/how TF holds it."""

    key: str
    value: np.ndarray
    device: int = 0
    part: Part | None = None


def v2_dtypes_vars() -> list[Var]:
    i64, u32, u64 = np.iinfo(np.int64), np.iinfo(np.uint32), np.iinfo(np.uint64)
    f32 = np.array([[0.0, -0.0, 1.5], [np.inf, -np.inf, 0.0]], dtype=np.float32)
    f32.view(np.uint32)[1, 2] = 0x7FC00001  # a NaN with a payload
    f16 = np.array([[0.0, -0.0, 1.5], [65504.0, -np.inf, 2.0**-24]], dtype=np.float16)
    return [
        Var("dtypes/float16", f16),
        # 0, 1, -2.5, a large normal, a small normal, +inf
        Var("dtypes/bfloat16", bf16_bits(0x0000, 0x3F80, 0xC020, 0x7F62, 0x8DA2, 0x7F80)),
        Var("dtypes/float32", f32),
        Var("dtypes/float64", np.array([np.pi, -1e-310, 1e308, -0.0])),
        Var("dtypes/int8", np.array([-128, -1, 0, 1, 127], dtype=np.int8)),
        Var("dtypes/int16", np.array([-32768, -1, 0, 32767], dtype=np.int16)),
        Var("dtypes/int32", np.array([[-(2**31), -1], [0, 2**31 - 1]], dtype=np.int32)),
        Var("dtypes/int64", np.array([i64.min, -1, 0, i64.max], dtype=np.int64)),
        Var("dtypes/uint8", np.array([0, 1, 128, 255], dtype=np.uint8)),
        Var("dtypes/uint16", np.array([0, 1, 65535], dtype=np.uint16)),
        Var("dtypes/uint32", np.array([0, 1, u32.max], dtype=np.uint32)),
        Var("dtypes/uint64", np.array([0, 1, u64.max], dtype=np.uint64)),
        Var("dtypes/bool", np.array([[True, False], [False, True]])),
        Var("dtypes/complex64", np.array([1 + 2j, -3.5 - 0.25j, complex(np.inf, 0)], np.complex64)),
        Var("dtypes/complex128", np.array([[1e-300 + 1e300j], [complex(-0.0, -1.0)]])),
        Var(
            "dtypes/string",
            strings(
                b"",
                b"hello",
                b"\x00\xff\xfe\x80binary\x00",
                "ünïcødé ключ".encode(),
                b"x" * 200,
                pattern(1500),
            ),
        ),
        Var("scalars/float32", np.array(3.25, dtype=np.float32)),
        Var("scalars/int64", np.array(-42, dtype=np.int64)),
        Var("scalars/bool", np.array(True)),
        Var("scalars/string", strings(b"scalar \x01 string", shape=())),
        Var("scalars/bfloat16", bf16(-1.5).reshape(())),
        Var("zero_size/float32", np.zeros((0, 3), dtype=np.float32)),
        Var("zero_size/string", strings(shape=(0, 3))),
        Var("rank5/int32", np.arange(12, dtype=np.int32).reshape(2, 1, 3, 1, 2)),
        Var("names/a/b/c/d/e/deeply/nested", np.array([1.0], dtype=np.float32)),
        Var("names/with space:and colon", np.array([7], dtype=np.int32)),
        Var("names/ünïcødé/ключ/名前", np.array([5], dtype=np.int8)),
        Var("names/dots.and-dashes_and>gt", np.array([9], dtype=np.uint8)),
        Var("names/trailing_slash/", np.array([2.5])),
        Var("names/UPPER", np.array([1], dtype=np.int16)),
        Var("names/lower", np.array([2], dtype=np.int16)),
        Var("global_step", np.array(7, dtype=np.int64)),
    ]


def v2_max_to_keep_vars(step: int) -> list[Var]:
    return [
        Var("w", (np.arange(6, dtype=np.float32) + step).reshape(2, 3)),
        Var("b", np.array([10 * step, 20 * step], dtype=np.int64)),
        Var("note", strings(b"step-%d" % step)),
    ]


def v2_sharded_vars() -> list[Var]:
    return [
        Var("dev0/w", np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), 0),
        Var("dev0/ids", np.array([1, 2, 3], dtype=np.int64), 0),
        Var("dev0/names", strings(b"alpha", b"", b"\xff\xfe"), 0),
        Var("dev1/w", np.arange(6, dtype=np.float64).reshape(2, 3), 1),
        Var("dev1/mask", np.array([True, False, True]), 1),
        Var("dev1/tags", strings(b"beta", b"gamma"), 1),
        Var("dev1/bf", bf16(1, 2, 3), 1),
    ]


def v2_partitioned_vars() -> list[Var]:
    return [
        Var("part/w", (np.arange(40, dtype=np.float32) / 4).reshape(10, 4), part=(3, 0)),
        Var("part/cols", np.arange(-7, 7, dtype=np.float64).reshape(2, 7), part=(3, 1)),
        Var("part/ids", np.arange(5, 0, -1, dtype=np.int64) * 10**12, part=(2, 0)),
        Var("part/str", strings(b"s0", b"", b"s2-long" * 3, b"\x80"), part=(2, 0)),
        Var("plain/b", np.array([0.5, -0.5], dtype=np.float32)),
    ]


def v1_single_vars() -> list[Var]:
    i64 = np.iinfo(np.int64)
    return [
        Var("v1/float32", np.array([[1.5, -2.0], [np.inf, 0.0]], dtype=np.float32)),
        Var("v1/float64", np.array([np.e, -1e-300])),
        Var("v1/int8", np.array([-128, 127], dtype=np.int8)),
        Var("v1/int16", np.array([-32768, 32767], dtype=np.int16)),
        Var("v1/int32", np.array(-123456, dtype=np.int32)),
        Var("v1/int64", np.array([i64.min, i64.max], dtype=np.int64)),
        Var("v1/uint8", np.array([0, 255], dtype=np.uint8)),
        Var("v1/bool", np.array([True, False, True])),
        Var("v1/string", strings(b"", b"v1 \xff\x00 bytes", pattern(1100))),
        Var("v1/float16", np.array([1.5, -0.0, 65504.0], dtype=np.float16)),
        Var("v1/uint16", np.array([0, 65535], dtype=np.uint16)),
        Var("v1/complex64", np.array([1 - 2j], dtype=np.complex64)),
        Var("v1/complex128", np.array([[0.5 + 0.25j, complex(-0.0, -1.0)]])),
        Var("v1/zero_size", np.zeros((0, 3), dtype=np.float32)),
        Var("v1/names/with space:colon", np.array([3], dtype=np.int32)),
        Var("v1/part", (np.arange(12, dtype=np.float32) * 1.5).reshape(6, 2), part=(3, 0)),
    ]


def v1_sharded_vars() -> list[Var]:
    return [
        Var("d0/w", np.arange(6, dtype=np.float32).reshape(2, 3), 0),
        Var("d0/s", strings(b"zero", b"\x00"), 0),
        Var("d0/i8", np.array([-1, 1], dtype=np.int8), 0),
        Var("d1/d", np.array([1.25]), 1),
        Var("d1/b", np.array(False), 1),
        Var("d1/u8", np.array([[1, 2], [3, 4]], dtype=np.uint8), 1),
        Var("d1/part", np.arange(15, dtype=np.int64).reshape(5, 3), 1, part=(2, 1)),
    ]


def v2_large_entry_vars() -> list[Var]:
    large = np.random.default_rng(20210).standard_normal((512, 511)).astype(np.float32)
    return [
        Var("a_tiny", np.array([1, -2, 3], dtype=np.int8)),
        Var("b_str", strings(b"abc", b"defgh")),
        Var("large/w", large),
        Var("m_tiny", np.array([True, False, True, True, False])),
        Var("z_tiny", np.array([-7.0])),
    ]


# -- TensorFlow: writing -------------------------------------------------------------------------


def tf_dtype_name(value: np.ndarray) -> str:
    return "string" if value.dtype == object else value.dtype.name


def op_name(index: int, key: str) -> str:
    return f"v{index}_{re.sub(r'[^A-Za-z0-9_]', '_', key)}"


def saver_save(
    directory: Path,
    steps: Sequence[tuple[int, list[Var]]],
    *,
    version: str,
    sharded: bool = False,
    max_to_keep: int = 5,
) -> None:
    """A graph-mode ``tf.compat.v1.train.Saver`` save of each (global_step, values)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import saver_pb2

    layout = steps[0][1]
    graph = tf.Graph()
    with graph.as_default():
        var_list: dict[str, Any] = {}
        # per key: [(initializer or assign op, placeholder, slices of the full value)]
        setters: dict[str, list[tuple[Any, Any, tuple[slice, ...]]]] = {}
        zero_inits: list[Any] = []  # partitions start as zeros, then get their slice
        for i, var in enumerate(layout):
            dtype = tf.as_dtype(tf_dtype_name(var.value))
            with tf.device(f"/cpu:{var.device}"):
                if var.part is None:
                    ph = tf.compat.v1.placeholder(dtype, var.value.shape)
                    v = tf.compat.v1.Variable(ph, name=op_name(i, var.key))
                    var_list[var.key] = v
                    setters[var.key] = [(v.initializer, ph, ())]
                    continue
                n, axis = var.part
                pv = tf.compat.v1.get_variable(
                    op_name(i, var.key),
                    var.value.shape,
                    dtype,
                    initializer=tf.compat.v1.zeros_initializer(),
                    partitioner=tf.compat.v1.fixed_size_partitioner(n, axis),
                )
                var_list[var.key] = pv
                setters[var.key] = []
                for p in pv:
                    zero_inits.append(p.initializer)
                    info = p._get_save_slice_info()
                    box = tuple(
                        slice(o, o + s)
                        for o, s in zip(info.var_offset, info.var_shape, strict=True)
                    )
                    ph = tf.compat.v1.placeholder(dtype, p.shape)
                    setters[var.key].append((tf.compat.v1.assign(p, ph), ph, box))
        saver = tf.compat.v1.train.Saver(
            var_list=var_list,
            sharded=sharded,
            max_to_keep=max_to_keep,
            write_version=getattr(saver_pb2.SaverDef, version),
            save_relative_paths=True,
        )
        devices = 1 + max(v.device for v in layout)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": devices})
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            first = True
            for step, values in steps:
                if not first:
                    time.sleep(1.1)  # distinct file times, as a training loop would leave
                ops, feeds = [], {}
                for var in values:
                    for op, ph, box in setters[var.key]:
                        ops.append(op)
                        feeds[ph] = var.value[box] if box else var.value
                if first and zero_inits:  # a partition is initialized before it is assigned
                    sess.run(zero_inits)
                sess.run(ops, feeds)
                saver.save(sess, str(directory / "model.ckpt"), global_step=step)
                first = False


# -- TensorFlow: reading back --------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    """``Type: message``, TF's own message only (no "Graph execution error:" banner, node
    names or stack)."""
    skip = ("Graph execution error", "Detected at node", "Node:", "File ", "[[", "Original stack")
    lines = [
        line.strip()
        for line in str(error).splitlines()
        if line.strip() and not line[0].isspace() and not line.startswith(skip)
    ]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def restore_v2(prefix: str, key: str, spec: str, dtype: Any) -> np.ndarray:
    import tensorflow as tf

    if tf.executing_eagerly():
        return np.asarray(
            tf.raw_ops.RestoreV2(
                prefix=prefix, tensor_names=[key], shape_and_slices=[spec], dtypes=[dtype]
            )[0].numpy()
        )
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        op = tf.raw_ops.RestoreV2(
            prefix=prefix, tensor_names=[key], shape_and_slices=[spec], dtypes=[dtype]
        )
        return np.asarray(sess.run(op)[0])


def tf_read(prefix: str, want: dict[str, Var]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of ``prefix`` as TF reads it, plus ``read_via`` for keys that needed more
    than ``get_tensor``."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    if set(dtypes) != set(want):
        raise AssertionError(f"{prefix}: TF lists {sorted(dtypes)}, expected {sorted(want)}")
    got: dict[str, np.ndarray] = {}
    via: dict[str, str] = {}
    for key, dtype in dtypes.items():
        if list(shapes[key]) != list(want[key].value.shape):
            raise AssertionError(f"{prefix}: {key} has shape {shapes[key]}")
        try:
            got[key] = np.asarray(reader.get_tensor(key))
            continue
        except Exception as e:  # what TF refuses is recorded
            tried = [f"get_tensor: {_first_line(e)}"]
        try:
            got[key] = restore_v2(prefix, key, "", dtype)
            via[key] = f"RestoreV2(full) [after: {' | '.join(tried)}]"
            continue
        except Exception as e:
            tried.append(f"RestoreV2(full): {_first_line(e)}")
        full = want[key].value
        out = np.empty_like(full)
        for spec, box in partition_specs(prefix, key, full.shape):
            out[box] = restore_v2(prefix, key, spec, dtype)
        got[key] = out
        via[key] = f"RestoreV2(per slice) [after: {' | '.join(tried)}]"
    return got, via


def partition_specs(
    prefix: str, key: str, shape: tuple[int, ...]
) -> list[tuple[str, tuple[slice, ...]]]:
    """The slices TF's reader lists for a partitioned variable, as (TF spec, numpy box)."""
    return [(p["spec"], _box(p)) for p in slice_info(prefix, key, shape)]


def _box(p: dict[str, Any]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(p["offset"], p["shape"], strict=True))


def slice_info(prefix: str, key: str, shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Partitions of ``key`` from the checkpoint itself: ``{offset, shape, spec}`` each."""
    import tensorflow as tf

    specs = _saved_slices(tf, prefix).get(key, [])
    out = []
    for extents in specs:
        offset = [0 if length < 0 else start for start, length in extents]
        size = [
            dim if length < 0 else length for (_, length), dim in zip(extents, shape, strict=True)
        ]
        spec = ":".join(f"{o},{s}" for o, s in zip(offset, size, strict=True))
        out.append(
            {
                "offset": offset,
                "shape": size,
                "spec": " ".join([*map(str, shape), spec]),
            }
        )
    return sorted(out, key=lambda p: p["offset"])


def _saved_slices(tf: Any, prefix: str) -> dict[str, list[list[tuple[int, int]]]]:
    """name -> slices, from the V2 index (BundleEntryProto.slices) or the V1 meta
    (SavedTensorSlices), read through TF's own table reader."""
    from tensorflow.core.protobuf import tensor_bundle_pb2
    from tensorflow.core.util import saved_tensor_slice_pb2

    out: dict[str, list[list[tuple[int, int]]]] = {}

    def extents(proto: Any) -> list[tuple[int, int]]:
        return [(e.start, e.length if e.HasField("length") else -1) for e in proto.extent]

    index = prefix + ".index"
    files = [index] if tf.io.gfile.exists(index) else sorted(tf.io.gfile.glob(prefix))
    for path in files:
        for key, value in _sstable(tf.io.gfile.GFile(path, "rb").read()):
            if path == index and key and not key.startswith(b"\x00"):
                entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
                if entry.slices:
                    out[key.decode()] = [extents(s) for s in entry.slices]
            elif path != index and key == b"":
                meta = saved_tensor_slice_pb2.SavedTensorSlices.FromString(value).meta
                for t in meta.tensor:
                    slices = [extents(s) for s in t.slice]
                    if any(any(n >= 0 for _, n in s) for s in slices):
                        out.setdefault(t.name, []).extend(slices)
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _sstable(data: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) of a LevelDB-style table (uncompressed blocks, as TF writes them)."""
    footer = data[-48:]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    out = []
    for _, handle in _block(data[index_offset : index_offset + index_size]):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        out.extend(_block(data[offset : offset + size]))
    return out


def _block(block: bytes) -> list[tuple[bytes, bytes]]:
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    pos, key, out = 0, b"", []
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        out.append((key, block[pos : pos + size]))
        pos += size
    return out


def bits(value: np.ndarray) -> bytes | list[bytes]:
    """What must match exactly: the raw little-endian bytes, or the list of strings."""
    if value.dtype == object:
        return [bytes(v) for v in value.reshape(-1)]
    if value.dtype.itemsize > 1 and value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    return np.ascontiguousarray(value).tobytes()


def verify(prefix: Path, values: list[Var]) -> dict[str, str]:
    """Read ``prefix`` back with TF and compare bit for bit; returns ``read_via``."""
    want = {v.key: v for v in values}
    got, via = tf_read(str(prefix), want)
    for key, var in want.items():
        value = got[key]
        expected_name = tf_dtype_name(var.value)
        got_name = "string" if value.dtype.kind in "OS" else value.dtype.name
        if got_name != expected_name or bits(
            value.astype(object) if got_name == "string" else value
        ) != bits(var.value):
            raise AssertionError(f"{prefix}: {key} reads back as {value!r}, saved {var.value!r}")
    return via


# -- the manifest --------------------------------------------------------------------------------


def sanitize(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")


def expected_path(prefix: str, key: str) -> str:
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"expected/{prefix.replace('?', '_')}/{sanitize(key)}__{digest}.npy"


def tensor_entry(
    case_dir: Path, prefix: str, var: Var, read_via: str | None, parts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The manifest entry of one tensor; writes its expected .npy."""
    from tensorflow.python.framework import dtypes as tf_dtypes

    value = var.value
    name = tf_dtype_name(value)
    entry: dict[str, Any] = {
        "dtype": name,
        "dtype_enum": int(tf_dtypes.as_dtype(name).as_datatype_enum),
        "shape": list(value.shape),
        "expected": expected_path(prefix, var.key),
    }
    path = case_dir / entry["expected"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "string":
        entry["npy_encoding"] = STRING_ENCODING
        np.save(path, value, allow_pickle=True)
        entry["values_b64"] = [base64.b64encode(v).decode() for v in value.reshape(-1)]
    else:
        stored = value.view(np.uint16) if name == "bfloat16" else value
        entry["npy_encoding"] = "bfloat16_bits_as_uint16" if name == "bfloat16" else "native"
        np.save(path, stored)
        entry["sha256"] = hashlib.sha256(bits(value)).hexdigest()  # type: ignore[arg-type]
    if parts:
        entry["partitions"] = parts
    if read_via:
        entry["read_via"] = read_via
    return entry


def checkpoint_files(case_dir: Path, prefix: str) -> list[str]:
    base = prefix.split("-?????")[0]
    return sorted(
        p.name
        for p in case_dir.iterdir()
        if p.is_file()
        and (p.name == base or p.name.startswith(base + ".") or fnmatch(p.name, prefix))
    )


def checkpoint_entry(
    case_dir: Path, prefix: str, values: list[Var], extra: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    via = verify(case_dir / prefix, values)
    tensors = {}
    for var in sorted(values, key=lambda v: v.key.encode()):
        parts = slice_info(str(case_dir / prefix), var.key, var.value.shape) if var.part else []
        if var.part and len(parts) != var.part[0]:
            raise AssertionError(f"{prefix}: {var.key} has {len(parts)} partitions")
        tensors[var.key] = tensor_entry(case_dir, prefix, var, via.get(var.key), parts)
        tensors[var.key].update((extra or {}).get(var.key, {}))
    return {
        "prefix": prefix,
        "files": checkpoint_files(case_dir, prefix),
        "verified_with_tf_reader": True,
        "tensors": tensors,
    }


def state_file_parsed(case_dir: Path) -> dict[str, Any]:
    from google.protobuf import json_format, text_format
    from tensorflow.python.training import checkpoint_state_pb2

    state = text_format.Parse(
        (case_dir / "checkpoint").read_text(), checkpoint_state_pb2.CheckpointState()
    )
    return json_format.MessageToDict(state, preserving_proto_field_name=True)


def write_manifest(
    case_dir: Path, case: str, fmt: str, calls: list[str], checkpoints: list[dict[str, Any]]
) -> None:
    import tensorflow as tf

    files = {
        p.name: p.stat().st_size
        for p in sorted(case_dir.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {
        "manifest_version": 1,
        "case": case,
        "description": CASES[case][1],
        "tf_version": tf.__version__,
        "checkpoint_format": fmt,
        "tf_calls": calls,
        "state_file": "checkpoint",
        "state_file_parsed": state_file_parsed(case_dir),
        "checkpoints": checkpoints,
        "files": files,
    }
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    (case_dir / "manifest.json").write_text(text, encoding="utf-8")


# -- the cases -----------------------------------------------------------------------------------

V1_SETUP = [
    "tf.compat.v1.disable_v2_behavior()",
    "v = tf.compat.v1.Variable(tf.compat.v1.placeholder(dtype, shape)); "
    "sess.run(v.initializer, {ph: value})  # per key, under tf.device('/cpu:N')",
]
PARTITIONED_CALL = (
    "pv = tf.compat.v1.get_variable(name, shape, dtype, "
    "initializer=tf.compat.v1.zeros_initializer(), "
    "partitioner=tf.compat.v1.fixed_size_partitioner(n, axis)); "
    "each partition then assigned its slice: "
)
SHARDED_SETUP = (
    "config = tf.compat.v1.ConfigProto(device_count={'CPU': 2}); "
    "variables created under tf.device('/cpu:0') or tf.device('/cpu:1')"
)


def _part_note(values: list[Var]) -> str:
    return "; ".join(
        f"'{v.key}' {tf_dtype_name(v.value)} {list(v.value.shape)} n={v.part[0]} axis={v.part[1]}"
        for v in values
        if v.part
    )


def simple_saver_case(
    case: str, directory: Path, values: list[Var], *, step: int, version: str, sharded: bool = False
) -> None:
    saver_save(directory, [(step, values)], version=version, sharded=sharded)
    base = f"model.ckpt-{step}"
    shards = 1 + max(v.device for v in values)
    prefix = f"{base}-?????-of-{shards:05d}" if version == "V1" and sharded else base
    calls = [*V1_SETUP]
    if sharded:
        calls.append(SHARDED_SETUP)
    if any(v.part for v in values):
        calls.append(PARTITIONED_CALL + _part_note(values))
    kw = SAVER_KW.format(v=version)
    calls.append(
        f"saver = tf.compat.v1.train.Saver(var_list={{key: v, ...}}, "
        f"{'sharded=True, ' if sharded else ''}{kw})"
    )
    calls.append(f"saver.save(sess, DIR + '/model.ckpt', global_step={step})")
    write_manifest(directory, case, version, calls, [checkpoint_entry(directory, prefix, values)])


def case_v2_dtypes(directory: Path) -> None:
    simple_saver_case("v2_dtypes", directory, v2_dtypes_vars(), step=7, version="V2")


def case_v2_max_to_keep(directory: Path) -> None:
    steps = [(step, v2_max_to_keep_vars(step)) for step in range(1, 5)]
    saver_save(directory, steps, version="V2", max_to_keep=2)
    kept = sorted(p.name for p in directory.glob("*.index"))
    if kept != ["model.ckpt-3.index", "model.ckpt-4.index"]:
        raise AssertionError(f"max_to_keep=2 left {kept}")
    calls = [
        *V1_SETUP,
        "saver = tf.compat.v1.train.Saver(var_list={...}, max_to_keep=2, "
        + SAVER_KW.format(v="V2")
        + ")",
        "for step in 1..4: assign new values; "
        "saver.save(sess, DIR + '/model.ckpt', global_step=step); time.sleep(1.1)",
    ]
    ckpts = [checkpoint_entry(directory, f"model.ckpt-{s}", v) for s, v in steps[2:]]
    write_manifest(directory, "v2_max_to_keep", "V2", calls, ckpts)


def case_v2_sharded(directory: Path) -> None:
    simple_saver_case(
        "v2_sharded", directory, v2_sharded_vars(), step=3, version="V2", sharded=True
    )
    data = sorted(p.name for p in directory.glob("*.data-*"))
    if data != ["model.ckpt-3.data-00000-of-00002", "model.ckpt-3.data-00001-of-00002"]:
        raise AssertionError(f"sharded save wrote {data}")


def case_v2_partitioned(directory: Path) -> None:
    simple_saver_case("v2_partitioned", directory, v2_partitioned_vars(), step=1, version="V2")


def case_v1_single(directory: Path) -> None:
    simple_saver_case("v1_single", directory, v1_single_vars(), step=5, version="V1")


def case_v1_sharded(directory: Path) -> None:
    simple_saver_case(
        "v1_sharded", directory, v1_sharded_vars(), step=5, version="V1", sharded=True
    )


def case_v2_large_entry(directory: Path) -> None:
    simple_saver_case("v2_large_entry", directory, v2_large_entry_vars(), step=1, version="V2")


def tf2_object_values(step: int) -> list[Var]:
    """What the model holds after ``step`` mutations (checkpoint key -> value)."""
    attr = "/.ATTRIBUTES/VARIABLE_VALUE"
    return [
        Var("model/w" + attr, (np.arange(6, dtype=np.float32) + step).reshape(3, 2)),
        Var("model/b" + attr, np.array([0.5, -0.5])),
        Var("model/step" + attr, np.array(step, dtype=np.int64)),
        Var("model/inner/scale" + attr, np.array([step, -step], dtype=np.float32)),
        Var("model/inner/label" + attr, strings(b"inner-0", shape=())),
        Var("model/blocks/0/scale" + attr, np.array([2, 4], dtype=np.float32)),
        Var("model/blocks/0/label" + attr, strings(b"inner-1", shape=())),
        Var("model/blocks/1/scale" + attr, np.array([3, 6], dtype=np.float32)),
        Var("model/blocks/1/label" + attr, strings(b"label-step-%d" % step, shape=())),
        Var("save_counter" + attr, np.array(step, dtype=np.int64)),
    ]


def case_tf2_object(directory: Path) -> None:
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    class Inner(tf.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.scale = tf.Variable(np.array([i + 1, 2 * (i + 1)], dtype=np.float32))
            self.label = tf.Variable(b"inner-%d" % i)

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.arange(6, dtype=np.float32).reshape(3, 2))
            self.b = tf.Variable(np.array([0.5, -0.5]))
            self.step = tf.Variable(np.int64(0))
            self.inner = Inner(0)
            self.blocks = [Inner(1), Inner(2)]

    model = Model()
    ckpt = tf.train.Checkpoint(model=model)
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=3)
    for i in range(1, 5):
        if i > 1:
            time.sleep(1.1)
        model.w.assign_add(tf.ones_like(model.w))
        model.step.assign(i)
        model.inner.scale.assign(np.array([i, -i], dtype=np.float32))
        model.blocks[1].label.assign(b"label-step-%d" % i)
        manager.save()
    kept = sorted(p.name for p in directory.glob("*.index"))
    if kept != ["ckpt-2.index", "ckpt-3.index", "ckpt-4.index"]:
        raise AssertionError(f"max_to_keep=3 left {kept}")

    ckpts = []
    graph_key = "_CHECKPOINTABLE_OBJECT_GRAPH"
    for step in (2, 3, 4):
        prefix = f"ckpt-{step}"
        graph = tf.train.load_checkpoint(str(directory / prefix)).get_tensor(graph_key)
        parsed = trackable_object_graph_pb2.TrackableObjectGraph.FromString(graph)
        if step == 4:
            text = text_format.MessageToString(parsed)
            (directory / f"object_graph_{prefix}.pbtxt").write_text(text)
        values = [*tf2_object_values(step), Var(graph_key, strings(graph, shape=()))]
        source = {"expected_source": "tf_reader (not predictable; recorded from TF's own read)"}
        ckpts.append(checkpoint_entry(directory, prefix, values, {graph_key: source}))
    calls = [
        "class Inner(tf.Module): self.scale = tf.Variable(float32[2]); "
        "self.label = tf.Variable(b'inner-i')",
        "class Model(tf.Module): self.w = tf.Variable(float32[3,2]); "
        "self.b = tf.Variable(float64[2]); self.step = tf.Variable(int64 0); "
        "self.inner = Inner(0); self.blocks = [Inner(1), Inner(2)]",
        "ckpt = tf.train.Checkpoint(model=Model()); "
        "mgr = tf.train.CheckpointManager(ckpt, DIR, max_to_keep=3)",
        "for i in 1..4: m.w.assign_add(1); m.step.assign(i); m.inner.scale.assign([i, -i]); "
        "m.blocks[1].label.assign(b'label-step-i'); mgr.save(); time.sleep(1.1)",
    ]
    for ck in ckpts:  # manifest files of this checkpoint: no .pbtxt
        ck["files"] = [f for f in ck["files"] if not f.endswith(".pbtxt")]
    write_manifest(directory, "tf2_object", "V2", calls, ckpts)


CASES: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    # name: (writer, description, graph mode)
    "v2_dtypes": (
        case_v2_dtypes,
        "One variable per checkpointable dtype (bfloat16, uint32/64, complex and string "
        "included), scalars, [0,3] zero-size tensors, a rank-5 tensor and keys with "
        "slashes, a space, a colon, unicode, '>' and a trailing '/'.",
        True,
    ),
    "v2_max_to_keep": (
        case_v2_max_to_keep,
        "Saver(max_to_keep=2) saving steps 1..4 (values change per step); only steps 3 and 4 "
        "remain. The tf.compat.v1 Saver writes paths only, no timestamps, in `checkpoint`.",
        True,
    ),
    "v2_sharded": (
        case_v2_sharded,
        "Saver(sharded=True) with variables on two logical CPU devices: one merged .index, "
        "data-00000-of-00002 and data-00001-of-00002.",
        True,
    ),
    "v2_partitioned": (
        case_v2_partitioned,
        "Partitioned variables (fixed_size_partitioner): the V2 index holds a full-name entry "
        "with `slices` plus one entry per slice; one plain variable beside them.",
        True,
    ),
    "v1_single": (
        case_v1_single,
        "V1 (TensorSliceWriter) single-file checkpoint: the 13 dtypes V1 can hold, a zero-size "
        "tensor, odd key names, and a float32 [6,2] variable split in 3 along axis 0.",
        True,
    ),
    "v1_sharded": (
        case_v1_sharded,
        "V1 checkpoint sharded over two logical CPU devices (model.ckpt-5-0000i-of-00002); an "
        "int64 [5,3] variable split in 2 along axis 1 lives on device 1.",
        True,
    ),
    "tf2_object": (
        case_tf2_object,
        "TF2 object-based checkpoint of a tf.Module with a nested module and a list of "
        "modules, saved 4 times by CheckpointManager(max_to_keep=3): ckpt-2..ckpt-4 remain; "
        "keys use .ATTRIBUTES/VARIABLE_VALUE plus _CHECKPOINTABLE_OBJECT_GRAPH.",
        False,
    ),
    "v2_large_entry": (
        case_v2_large_entry,
        "One float32 [512,511] tensor (1,046,528 bytes, seeded standard normal) between small "
        "odd-sized tensors, so data-file offsets are neither aligned nor padded.",
        True,
    ),
}


# -- TensorFlow's own proto descriptors ----------------------------------------------------------


def write_tf_descriptors(out: Path) -> None:
    """``tf_descriptors.binpb``: a FileDescriptorSet of TF's tensor_bundle.proto and everything
    it imports, taken from the wheel (which ships no .proto files). tests/test_protos.py loads
    it beside anyckpt's own protos."""
    from google.protobuf import descriptor_pb2
    from tensorflow.core.protobuf import tensor_bundle_pb2

    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(fd: Any) -> None:
        if fd.name in files:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files[fd.name] = proto

    add(tensor_bundle_pb2.DESCRIPTOR)
    fds = descriptor_pb2.FileDescriptorSet(file=list(files.values()))
    (out / "tf_descriptors.binpb").write_bytes(fds.SerializeToString(deterministic=True))


# -- driver --------------------------------------------------------------------------------------


def run_one(case: str, out: Path) -> None:
    """Write one case into a fresh folder and swap it in only when it is verified."""
    import tensorflow as tf

    writer, _, graph_mode = CASES[case]
    if graph_mode:
        tf.compat.v1.disable_v2_behavior()
    work = out / f".{case}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    writer(work)
    final = out / case
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)


def versions() -> dict[str, str]:
    import platform

    import google.protobuf
    import ml_dtypes
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "protobuf": google.protobuf.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }


README = """\
# TensorFlow-written checkpoint fixtures (tensorflow-cpu {tensorflow})

Written by real TensorFlow with this repository's generator, `tools/tf/make_fixtures.py`
(`make fixtures`, which runs it in `.venv-tf`):

    .venv-tf/bin/python tools/tf/make_fixtures.py tests/fixtures/tf-2.21

Versions of the last run: tensorflow-cpu {tensorflow}, numpy {numpy}, ml_dtypes {ml_dtypes},
protobuf {protobuf}, CPython {python}, {platform}. This README is written by the generator.

Every case is written in a process of its own, then read back with TF's
`tf.train.load_checkpoint` (or `RestoreV2` where that reader refuses; see `read_via`) and
compared bit for bit with the values that were saved, before its folder is replaced. The tests
use these files in place and never need TensorFlow for them; a missing file is a test failure.

What a rerun changes, and what it does not:
- With the same versions, every file comes out byte for byte the same except
  `tf2_object/checkpoint` and, in `tf2_object/manifest.json`, `state_file_parsed` and the
  file's size: CheckpointManager writes `time.time()` timestamps. (Checked by regenerating
  into a scratch folder and `diff -rq` against the committed copy.) Tests read those timestamps
  from the file or the manifest and never hard-code them.
- The values are fixed in the generator (the large tensor from a seeded NumPy generator), so
  the `.index`, `.data` and V1 files depend only on TensorFlow's writer. Other versions of
  TensorFlow may write other `.meta` graphs; another NumPy may write other `.npy` headers.

## Folder layout (every case)

- The checkpoint files exactly as TF wrote them, plus the `checkpoint` state file.
- `manifest.json`:
  - `manifest_version` (1), `case`, `description`, `tf_version`, `checkpoint_format` (V1/V2),
    `tf_calls` (the TF calls that made it).
  - `state_file` (`checkpoint`) and `state_file_parsed`: that file parsed as a CheckpointState.
  - `files`: {{name: size}} of every file of the case but `manifest.json` and `expected/`.
  - `checkpoints`: a list of `{{prefix, files, verified_with_tf_reader, tensors}}`. `prefix` is
    relative to the case folder; for V1 sharded it is the `?????` pattern.
- `tensors` maps each checkpoint key (as `get_variable_to_shape_map()` lists it; partitioned
  variables appear once, under their full name) to:
  - `dtype`: TF's name (`float32`, `bfloat16`, `string`...), and `dtype_enum` (DataType number).
  - `shape`: a list of ints; `[]` is a scalar.
  - `expected`: `expected/<prefix>/<key>__<sha1(key)[:8]>.npy`, with `?` in the prefix and
    runs of `[^A-Za-z0-9._-]` in the key (stripped of `_` at its ends) written as `_`.
  - `npy_encoding`: `native`; `bfloat16_bits_as_uint16` (the raw bits as uint16); or
    `object_bytes (np.load(..., allow_pickle=True))` (an object array of `bytes`).
  - `sha256`: of the raw little-endian C-order bytes (numeric dtypes; bool is 1 byte).
  - `values_b64`: string dtypes only; the flattened C-order elements, base64 (authoritative).
  - `partitions`: partitioned variables only; `{{offset, shape, spec}}` for each slice.
  - `read_via`: set when `get_tensor` could not read the key; what was used instead.
  - `expected_source`: set when the value was recorded from TF's read (the object graph).

Also here: `tf_descriptors.binpb`, a FileDescriptorSet of TF's own `tensor_bundle.proto` and
its imports, taken from the wheel (which ships no `.proto` files); `tests/test_protos.py` loads
it beside anyckpt's protos.

## Cases

{cases}
"""


def write_readme(out: Path, info: dict[str, str]) -> None:
    cases = "\n".join(f"- **{name}**: {desc}" for name, (_, desc, _) in CASES.items())
    (out / "README.md").write_text(README.format(cases=cases, **info))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder, e.g. tests/fixtures/tf-2.21")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these")
    parser.add_argument(
        "--one", choices=[*CASES, "descriptors", "versions"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.one == "descriptors":
        write_tf_descriptors(out)
    elif args.one == "versions":
        print(json.dumps(versions()))
    elif args.one:
        run_one(args.one, out)
    else:
        me = [sys.executable, str(Path(__file__).resolve()), str(out)]
        for case in args.case or list(CASES):
            start = time.monotonic()
            subprocess.run([*me, "--one", case], check=True)
            print(f"{case}: written and verified in {time.monotonic() - start:.1f} s")
        subprocess.run([*me, "--one", "descriptors"], check=True)
        info = subprocess.run(
            [*me, "--one", "versions"], check=True, capture_output=True, text=True
        )
        write_readme(out, json.loads(info.stdout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

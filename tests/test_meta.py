"""The ``.meta`` file (anyckpt.meta): MetaGraphDef built as TensorFlow's Saver builds it, parsed
back, checked against the TF-written fixtures, written by ``save``/the manager, and refused
cleanly when damaged. Real TensorFlow restoring these graphs is in tests/interop/test_tf_meta.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from google.protobuf import text_format
from hypothesis import given
from hypothesis import strategies as st

import anyckpt
import anyckpt.api
from anyckpt import sync
from anyckpt._proto.meta_graph_pb2 import MetaGraphDef
from anyckpt._proto.node_def_pb2 import NodeDef
from anyckpt._proto.variable_pb2 import VariableDef
from anyckpt.codecs import DecodeError
from anyckpt.codecs.dtypes import dtype_from_enum
from anyckpt.meta import (
    V1,
    V2,
    MetaGraphInfo,
    SaverConfig,
    build_meta_graph,
    decode_meta_graph,
    encode_meta_graph,
    sanitize_op_name,
    saver_version,
)
from anyckpt.partitioned import Partitioned

#: TensorFlow's op-name rule (python/framework/ops.py, _VALID_OP_NAME_REGEX).
VALID_OP_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")


class Spec:
    """dtype/shape (and partitions) without data, like a reader's TensorSpec."""

    def __init__(self, dtype: Any, shape: Sequence[int], partitions: Sequence[Any] = ()) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.partitions = tuple(partitions)


def strings(*items: bytes) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


# -- TF-written fixtures as the model -------------------------------------------------------


def fixture_case(case: str) -> tuple[dict[str, Any], MetaGraphDef, bytes]:
    manifest = json.loads((FIXTURES / case / "manifest.json").read_text())
    ckpt = manifest["checkpoints"][0]
    name = ckpt["prefix"].split("-?????")[0] if "?????" in ckpt["prefix"] else ckpt["prefix"]
    data = (FIXTURES / case / f"{name}.meta").read_bytes()
    return ckpt, MetaGraphDef.FromString(data), data


def fixture_specs(ckpt: Mapping[str, Any]) -> dict[str, Spec]:
    return {
        key: Spec(
            dtype_from_enum(t["dtype_enum"]),
            t["shape"],
            [tuple(zip(p["offset"], p["shape"], strict=True)) for p in t.get("partitions", [])],
        )
        for key, t in ckpt["tensors"].items()
    }


def save_subgraph(meta: MetaGraphDef) -> list[tuple[str, str, tuple[str, ...], str, NodeDef]]:
    """The save/ nodes with variable names replaced by ``<key spec>`` (names differ: the
    fixtures name variables vN_..., we name them after the key)."""
    info = decode_meta_graph(meta.SerializeToString())
    alias = {v.name: f"<{v.checkpoint_key} {v.slice_spec}>" for v in info.variables}

    def rename(name: str) -> str:
        base, sep, rest = name.partition("/read")
        if base in alias and (not sep or rest == ""):
            return alias[base] + sep
        return alias.get(name, name)

    out = []
    for node in meta.graph_def.node:
        if not node.name.startswith("save/"):
            continue
        inputs = []
        for item in node.input:
            control = item.startswith("^")
            base, sep, index = item.lstrip("^").partition(":")
            inputs.append(("^" if control else "") + rename(base) + sep + index)
        copy = NodeDef()
        copy.CopyFrom(node)
        if "_class" in copy.attr:
            locs = [s.decode()[len("loc:@") :] for s in copy.attr["_class"].list.s]
            copy.attr["_class"].list.s[:] = [f"loc:@{rename(n)}".encode() for n in locs]
        out.append((node.name, node.op, tuple(inputs), node.device, copy))
    return out


FIXTURE_CASES = [
    ("v2_dtypes", V2, None, True),
    ("v2_large_entry", V2, None, True),
    ("v2_sharded", V2, ("dev0/", "dev1/"), False),
    ("v1_single", V1, None, True),
    ("v1_sharded", V1, ("d0/", "d1/"), False),
]


@pytest.mark.parametrize(("case", "version", "groups", "same_devices"), FIXTURE_CASES)
def test_save_subgraph_matches_tensorflows(
    case: str, version: int, groups: tuple[str, ...] | None, same_devices: bool
) -> None:
    """Node for node, the save/restore subgraph is the one TF's Saver wrote: names, ops,
    inputs, and every attr we set has TF's value (TF adds _output_shapes and defaults)."""
    ckpt, tf_meta, _ = fixture_case(case)
    specs = fixture_specs(ckpt)
    shards = None
    if groups:
        shards = [[k for k in specs if k.startswith(g)] for g in groups]
    ours = build_meta_graph(specs, SaverConfig(version=version), shards=shards)
    theirs, mine = save_subgraph(tf_meta), save_subgraph(ours)
    assert [n[:3] for n in mine] == [n[:3] for n in theirs]
    for (name, _, _, tf_device, tf_node), (_, _, _, device, node) in zip(theirs, mine, strict=True):
        if same_devices:  # sharded fixtures put shard 1 on CPU:1; we pin every shard to CPU:0
            assert device == tf_device, name
        for key, value in node.attr.items():
            assert key in tf_node.attr, (name, key)
            assert tf_node.attr[key] == value, (name, key)
    assert SaverConfig.from_proto(ours.saver_def) == SaverConfig.from_proto(tf_meta.saver_def)


@pytest.mark.parametrize("case", ["v2_dtypes", "v1_single"])
def test_variables_and_collections_match_tensorflows(case: str) -> None:
    ckpt, tf_meta, _ = fixture_case(case)
    ours = build_meta_graph(fixture_specs(ckpt))
    for meta in (tf_meta, ours):
        info = decode_meta_graph(meta.SerializeToString())
        nodes = {n.name: n for n in meta.graph_def.node}
        for var in info.variables:
            node = nodes[var.name]
            assert node.op == "VariableV2"
            assert set(node.attr) >= {"dtype", "shape"}
            assert nodes[f"{var.name}/Assign"].input[0] == var.name
            assert nodes[f"{var.name}/read"].op == "Identity"
        for name in ("variables", "trainable_variables"):
            defs = [VariableDef.FromString(v) for v in meta.collection_def[name].bytes_list.value]
            assert len(defs) == len(info.variables)
            for d in defs:
                base = d.variable_name.removesuffix(":0")
                assert d.initializer_name == f"{base}/Assign"
                assert d.snapshot_name == f"{base}/read:0"
                assert d.trainable
                assert not d.is_resource
                assert nodes[d.initial_value_name.removesuffix(":0")].name
    tf_vars = {
        (v.checkpoint_key, v.slice_spec): v
        for v in decode_meta_graph(tf_meta.SerializeToString()).variables
    }
    our_vars = {
        (v.checkpoint_key, v.slice_spec): v
        for v in decode_meta_graph(ours.SerializeToString()).variables
    }
    assert tf_vars.keys() == our_vars.keys()
    for where, var in our_vars.items():
        assert (var.dtype_enum, var.shape) == (tf_vars[where].dtype_enum, tf_vars[where].shape)


def test_partitioned_slice_info_matches_tensorflows() -> None:
    ckpt, tf_meta, _ = fixture_case("v1_single")
    ours = build_meta_graph(fixture_specs(ckpt))

    def slice_infos(meta: MetaGraphDef) -> list[tuple[list[int], list[int], list[int]]]:
        out = []
        for raw in meta.collection_def["variables"].bytes_list.value:
            info = VariableDef.FromString(raw).save_slice_info_def
            if info.full_name:
                out.append((list(info.full_shape), list(info.var_offset), list(info.var_shape)))
        return out

    assert (
        slice_infos(ours)
        == slice_infos(tf_meta)
        == [
            ([6, 2], [0, 0], [2, 2]),
            ([6, 2], [2, 0], [2, 2]),
            ([6, 2], [4, 0], [2, 2]),
        ]
    )


# -- reading TF's .meta -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["v2_dtypes", "v2_sharded", "v1_single", "v1_sharded"])
def test_reads_tensorflow_meta(case: str) -> None:
    ckpt, tf_meta, data = fixture_case(case)
    info = decode_meta_graph(data)
    assert info.tensorflow_version == "2.21.0"
    assert info.num_nodes == len(tf_meta.graph_def.node)
    assert info.saver is not None
    assert info.saver.version == (V1 if case.startswith("v1") else V2)
    assert info.saver.sharded == case.endswith("sharded")
    assert info.saver.max_to_keep == 5
    assert info.saver.keep_checkpoint_every_n_hours is None  # TF's 10000 = never
    assert info.saver.restore_op_name == "save/restore_all"
    keys = {v.checkpoint_key for v in info.variables}
    assert keys == set(ckpt["tensors"])
    for var in info.variables:
        expected = ckpt["tensors"][var.checkpoint_key]
        assert var.dtype_name == expected["dtype"]
        assert var.trainable
        if not var.slice_spec:
            assert list(var.shape or ()) == expected["shape"]
    assert set(info.collections) == {"variables", "trainable_variables"}
    assert sorted(info.collections["variables"]) == sorted(f"{v.name}:0" for v in info.variables)
    json.dumps(info.to_dict())  # JSON-ready for `anyckpt inspect --json`


def test_read_meta_graph_api_on_fixture() -> None:
    info = sync.read_meta_graph(str(FIXTURES / "v2_dtypes" / "model.ckpt-7"))  # the prefix
    assert isinstance(info, MetaGraphInfo)
    same = sync.read_meta_graph(str(FIXTURES / "v2_dtypes" / "model.ckpt-7.meta"))
    assert same == info
    assert info.saver is not None
    assert info.saver.manager_kwargs() == {
        "max_to_keep": 5,
        "keep_checkpoint_every_n_hours": None,
        "format": "v2",
    }
    bf16 = next(v for v in info.variables if v.checkpoint_key == "dtypes/bfloat16")
    assert bf16.dtype == np.dtype(ml_dtypes.bfloat16)


def test_reads_resource_variables() -> None:
    """A graph of TF2-style resource variables: VarHandleOp, restored through an Identity
    into AssignVariableOp (as TF's Saver builds it for ResourceVariable)."""
    meta = MetaGraphDef()
    g = meta.graph_def
    g.node.add(name="v", op="VarHandleOp").attr["dtype"].type = 1  # type: ignore[assignment]
    g.node[-1].attr["shape"].shape.dim.add(size=3)
    names = g.node.add(name="save/RestoreV2/tensor_names", op="Const")
    names.attr["value"].tensor.string_val.extend([b"a", b"the/key"])
    names.attr["value"].tensor.tensor_shape.dim.add(size=2)
    slices = g.node.add(name="save/RestoreV2/shape_and_slices", op="Const")
    slices.attr["value"].tensor.string_val.append(b"")  # one value, repeated (TF's fill rule)
    slices.attr["value"].tensor.tensor_shape.dim.add(size=2)
    g.node.add(
        name="save/RestoreV2",
        op="RestoreV2",
        input=["save/Const", "save/RestoreV2/tensor_names", "save/RestoreV2/shape_and_slices"],
    )
    g.node.add(name="save/Identity_1", op="Identity", input=["save/RestoreV2:1"])
    g.node.add(name="save/AssignVariableOp", op="AssignVariableOp", input=["v", "save/Identity_1"])
    g.node.add(name="save/restore_all", op="NoOp", input=["^save/AssignVariableOp"])
    meta.saver_def.restore_op_name = "save/restore_all"
    [var] = decode_meta_graph(meta.SerializeToString()).variables
    assert (var.name, var.op, var.shape, var.dtype_name) == ("v", "VarHandleOp", (3,), "float32")
    assert (var.checkpoint_key, var.slice_spec) == ("the/key", "")


# -- building ---------------------------------------------------------------------------------


def test_round_trip_odd_keys_to_valid_unique_op_names() -> None:
    keys = [
        "w",
        "w/read",  # would clash with w's snapshot
        "w/Assign",
        "a b",
        "a_b",  # sanitizes to the same name as "a b"
        "ünï/cødé",
        "trailing/",
        "/leading",
        "_under",
        "save/x",  # pushes the saver into scope save_1
        "col:on",
        "gt>ok",
        "bad\udcffbyte",  # a non-UTF-8 key (surrogate-escaped byte 0xff)
    ]
    tensors = {k: Spec(np.float32, (i,)) for i, k in enumerate(keys)}
    info = decode_meta_graph(encode_meta_graph(tensors))
    names = [v.name for v in info.variables]
    assert len(set(names)) == len(names) == len(keys)
    assert all(VALID_OP_NAME.fullmatch(n) for n in names), names
    assert {v.checkpoint_key: v.shape for v in info.variables} == {
        k: (i,) for i, k in enumerate(keys)
    }
    assert info.variable("w").checkpoint_key == "w"
    assert info.variable("w/read_1").checkpoint_key == "w/read"
    assert info.saver is not None
    assert info.saver.restore_op_name == "save_1/restore_all"
    assert info.saver.filename_tensor_name == "save_1/Const:0"
    meta = MetaGraphDef.FromString(encode_meta_graph(tensors))
    all_names = [n.name for n in meta.graph_def.node]
    assert len(set(all_names)) == len(all_names)


def test_sanitize_op_name() -> None:
    assert sanitize_op_name("a/b c/d:e") == "a/b_c/d_e"
    assert sanitize_op_name("//x//") == "x"
    assert sanitize_op_name("_x") == "v_x"
    assert sanitize_op_name("/") == "v"


def test_every_dtype_tf_can_assign() -> None:
    dtypes = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.int8, np.int16]
    dtypes += [np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
    dtypes += [np.complex64, np.complex128, object]
    tensors = {f"t{i}": Spec(dt, (2, 0, 1)) for i, dt in enumerate(dtypes)}
    info = decode_meta_graph(encode_meta_graph(tensors))
    assert {v.checkpoint_key: v.dtype for v in info.variables} == {
        k: s.dtype for k, s in tensors.items()
    }
    meta = MetaGraphDef.FromString(encode_meta_graph(tensors))
    zeros = {n.name: n for n in meta.graph_def.node if n.name.endswith("/Initializer/zeros")}
    assert len(zeros) == len(dtypes)
    for node in zeros.values():  # shape and no values: TF fills zeros; a few bytes only
        tensor = node.attr["value"].tensor
        assert [d.size for d in tensor.tensor_shape.dim] == [2, 0, 1]
        assert tensor.ByteSize() < 20


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.int4])
def test_dtypes_tf_cannot_assign_are_refused(dtype: Any) -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError, match="cannot assign"):
        build_meta_graph({"x": Spec(dtype, (2,))})


def test_initializer_is_small_for_huge_variables() -> None:
    data = encode_meta_graph({"huge": Spec(np.float32, (1 << 20, 1 << 12))})
    assert len(data) < 8000


def test_encoding_is_deterministic() -> None:
    tensors = {"b": Spec(np.int64, (3,)), "a": Spec(np.float32, ())}
    assert encode_meta_graph(tensors) == encode_meta_graph(dict(reversed(tensors.items())))


def test_meta_info() -> None:
    meta = build_meta_graph({"x": Spec(np.float32, ())}, tags=["train"])
    assert meta.meta_info_def.meta_graph_version == f"anyckpt {anyckpt.__version__}"
    assert list(meta.meta_info_def.tags) == ["train"]
    # Left empty: TF parses it as a PEP 440 version when set, and it is TF's own version.
    assert meta.meta_info_def.tensorflow_version == ""
    assert meta.graph_def.versions.producer > 0


def test_sharded_v2_and_v1_save_ops() -> None:
    tensors = {k: Spec(np.float32, (1,)) for k in "abcd"}
    shards = [["c", "a"], ["d", "b"]]
    v2 = build_meta_graph(tensors, shards=shards)
    ops = {n.name: n for n in v2.graph_def.node}
    assert v2.saver_def.save_tensor_name == "save/Identity:0"
    assert v2.saver_def.sharded
    assert ops["save/num_shards"].attr["value"].tensor.int_val == [2]
    assert list(ops["save/SaveV2"].input[3:]) == ["a", "c"]  # key order within a shard
    assert list(ops["save/SaveV2_1"].input[3:]) == ["b", "d"]
    assert ops["save/MergeV2Checkpoints"].attr["delete_old_dirs"].b
    v1 = build_meta_graph(tensors, SaverConfig(version=V1), shards=shards)
    assert v1.saver_def.save_tensor_name == "save/ShardedFilespec:0"
    assert {n.op for n in v1.graph_def.node} >= {"SaveSlices", "ShardedFilespec", "RestoreV2"}
    one = build_meta_graph(tensors, SaverConfig(sharded=True))  # sharded=True, one group
    assert one.saver_def.sharded
    assert one.saver_def.save_tensor_name == "save/Identity:0"


@pytest.mark.parametrize("shards", [[["a"]], [["a", "b"], ["b"]], [["a", "b", "z"]]])
def test_bad_shards_are_refused(shards: list[list[str]]) -> None:
    with pytest.raises(ValueError, match="exactly once"):
        build_meta_graph({"a": Spec(np.int8, ()), "b": Spec(np.int8, ())}, shards=shards)


def test_empty_and_bad_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_meta_graph({})
    with pytest.raises(ValueError, match="V1 or V2"):
        build_meta_graph({"x": Spec(np.int8, ())}, SaverConfig(version=0))


def test_partitioned_tensor_becomes_partition_variables() -> None:
    full = np.arange(12, dtype=np.float64).reshape(6, 2)
    info = decode_meta_graph(encode_meta_graph({"p": Partitioned.split(full, 3)}))
    assert [(v.name, v.shape, v.slice_spec) for v in info.variables] == [
        ("p/part_0", (2, 2), "6 2 0,2:0,2"),
        ("p/part_1", (2, 2), "6 2 2,2:0,2"),
        ("p/part_2", (2, 2), "6 2 4,2:0,2"),
    ]
    assert {v.checkpoint_key for v in info.variables} == {"p"}


# -- the SaverDef mapping -------------------------------------------------------------------


def test_saver_config_maps_one_to_one_onto_saver_def() -> None:
    config = SaverConfig(max_to_keep=None, keep_checkpoint_every_n_hours=None, version=V1)
    proto = config.to_proto()
    assert (proto.max_to_keep, proto.keep_checkpoint_every_n_hours, proto.version) == (0, 10000, 1)
    assert SaverConfig.from_proto(proto) == config
    kept = SaverConfig(max_to_keep=3, keep_checkpoint_every_n_hours=0.5, sharded=True)
    assert SaverConfig.from_proto(kept.to_proto()) == kept
    assert kept.manager_kwargs() == {
        "max_to_keep": 3,
        "keep_checkpoint_every_n_hours": 0.5,
        "format": "v2",
    }
    with pytest.raises(anyckpt.UnsupportedFormatError):
        SaverConfig(version=0).manager_kwargs()


def test_saver_version_of_formats() -> None:
    assert saver_version("v2") == V2
    assert saver_version(anyckpt.get_format("v1")) == V1

    class Custom:
        name = "custom"
        tf_saver_version = 1

    assert saver_version(Custom()) == V1
    with pytest.raises(anyckpt.UnsupportedFormatError, match="zstd"):
        saver_version("zstd")
    with pytest.raises(anyckpt.UnsupportedFormatError):
        SaverConfig.for_format("safetensors")


# -- damaged input ---------------------------------------------------------------------------


def _corrupt_inputs() -> list[tuple[str, bytes]]:
    good = encode_meta_graph({"x": Spec(np.float32, (2,))})
    bad_var = MetaGraphDef()
    bad_var.collection_def["variables"].bytes_list.value.append(b"\x0a\xff\xff")
    return [
        ("empty", b""),
        ("truncated", good[: len(good) // 2]),
        ("garbage", bytes(range(256)) * 4),
        ("text garbage", b"meta_info_def { nonsense: 1 }"),
        ("bad VariableDef", bad_var.SerializeToString()),
        ("deep nesting", b"\x12\x02" * 50 + b"\x0a\xff"),
    ]


@pytest.mark.parametrize(("what", "data"), _corrupt_inputs(), ids=lambda x: str(x)[:20])
def test_corrupt_meta_raises_decode_error(what: str, data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_meta_graph(data)


def test_corrupt_meta_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.meta"
    good = encode_meta_graph({"x": Spec(np.float32, (2,))})
    path.write_bytes(good[:-7])
    with pytest.raises(anyckpt.CorruptCheckpointError, match=re.escape(str(path))):
        sync.read_meta_graph(str(path))
    with pytest.raises(anyckpt.CheckpointNotFoundError):
        sync.read_meta_graph(str(tmp_path / "missing"))


def test_oversized_meta_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.meta"
    path.write_bytes(encode_meta_graph({"x": Spec(np.float32, (2,))}))
    monkeypatch.setattr(anyckpt.api, "MAX_META_BYTES", 16)
    with pytest.raises(anyckpt.CorruptCheckpointError):
        sync.read_meta_graph(str(path))


def test_hostile_graph_parses_without_crashing() -> None:
    """Dangling inputs, an Identity cycle, an output index past the tensor names, a restore
    op without inputs, and attrs of the wrong kind: no key, but no exception either."""
    meta = MetaGraphDef()
    g = meta.graph_def
    for name in ("a", "b", "c", "d"):
        g.node.add(name=name, op="VariableV2")
    g.node[0].attr["dtype"].s = b"not a type"
    g.node[1].attr["shape"].shape.unknown_rank = True
    names = g.node.add(name="s/names", op="Const")
    names.attr["value"].tensor.string_val.append(b"k")
    g.node.add(name="s/R", op="RestoreV2", input=["f", "s/names", "s/missing"])
    g.node.add(name="s/R0", op="RestoreV2")
    g.node.add(name="s/loop1", op="Identity", input=["s/loop2"])
    g.node.add(name="s/loop2", op="Identity", input=["s/loop1"])
    g.node.add(name="s/A0", op="Assign", input=["a", "s/R:5"])  # index past the names
    g.node.add(name="s/A1", op="Assign", input=["b", "s/loop1"])
    g.node.add(name="s/A2", op="Assign", input=["c", "s/R0"])
    g.node.add(name="s/A3", op="Assign", input=["d"])
    g.node.add(name="s/A4", op="Assign", input=["nowhere", "s/R"])
    meta.saver_def.restore_op_name = "s/restore_all"
    info = decode_meta_graph(meta.SerializeToString())
    assert [v.checkpoint_key for v in info.variables] == [None, None, None, None]
    assert info.variable("b").shape is None


def test_text_format_meta_is_read() -> None:
    """TF's export_meta_graph(as_text=True) writes the text format; TF reads both."""
    meta = build_meta_graph({"x": Spec(np.int32, (4,))})
    text = text_format.MessageToString(meta).encode()
    assert decode_meta_graph(text) == decode_meta_graph(meta.SerializeToString())


# -- save and the manager --------------------------------------------------------------------


def test_save_writes_meta_first_and_lists_it(tmp_path: Path) -> None:
    prefix = str(tmp_path / "m" / "model")
    tensors = {"w": np.ones((2, 3), np.float32), "s": strings(b"a", b"")}
    files = sync.save(prefix, tensors, write_meta_graph=True)
    assert files[-1] == prefix + ".meta"
    info = sync.read_meta_graph(prefix)
    assert {v.checkpoint_key: (v.dtype_name, v.shape) for v in info.variables} == {
        "w": ("float32", (2, 3)),
        "s": ("string", (2,)),
    }
    assert info.saver is not None
    assert not info.saver.sharded
    sync.save(str(tmp_path / "plain"), tensors)  # off by default
    assert not os.path.exists(str(tmp_path / "plain.meta"))


def test_save_meta_follows_the_shard_plan(tmp_path: Path) -> None:
    prefix = str(tmp_path / "model")
    tensors = {k: np.zeros(3, np.int32) for k in ("a", "b", "c")}
    files = sync.save(
        prefix,
        tensors,
        write_meta_graph=True,
        options={"devices": {"a": "/cpu:1", "b": "/cpu:0", "c": "/cpu:1"}},
    )
    assert sum(".data-" in f for f in files) == 2
    meta = MetaGraphDef.FromString(Path(prefix + ".meta").read_bytes())
    ops = {n.name: n for n in meta.graph_def.node}
    assert meta.saver_def.sharded
    assert list(ops["save/SaveV2"].input[3:]) == ["b"]  # devices in name order, as TF
    assert list(ops["save/SaveV2_1"].input[3:]) == ["a", "c"]


def test_save_removes_meta_when_the_checkpoint_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = anyckpt.get_format("v2")

    async def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        sync.save(str(tmp_path / "model"), {"x": np.ones(2)}, write_meta_graph=True)
    assert os.listdir(tmp_path) == []


def test_save_refuses_meta_for_unsupported_dtype_before_writing(tmp_path: Path) -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError):
        sync.save(
            str(tmp_path / "m"),
            {"x": np.ones(2, ml_dtypes.float8_e5m2)},
            write_meta_graph=True,
        )
    assert os.listdir(tmp_path) == []


def test_export_meta_graph_for_an_existing_checkpoint(tmp_path: Path) -> None:
    prefix = str(tmp_path / "model")
    full = np.arange(8, dtype=np.int64).reshape(4, 2)
    sync.save(prefix, {"p": Partitioned.split(full, 2), "q": np.float32(1)}, format="v1")
    path = sync.export_meta_graph(prefix, max_to_keep=None)
    assert path == prefix + ".meta"
    info = sync.read_meta_graph(path)
    assert info.saver is not None
    assert (info.saver.version, info.saver.max_to_keep) == (V1, None)
    assert sorted((v.checkpoint_key, v.slice_spec) for v in info.variables) == [
        ("p", "4 2 0,2:0,2"),
        ("p", "4 2 2,2:0,2"),
        ("q", ""),
    ]


def test_manager_writes_meta_and_retention_deletes_it(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    with sync.CheckpointManager(
        str(directory), max_to_keep=2, keep_checkpoint_every_n_hours=3.0, write_meta_graph=True
    ) as manager:
        for step in (1, 2, 3):
            manager.save({"x": np.full(2, step, np.int32)}, step=step).wait()
    names = sorted(os.listdir(directory))
    assert [n for n in names if n.endswith(".meta")] == ["ckpt-2.meta", "ckpt-3.meta"]
    info = sync.read_meta_graph(str(directory / "ckpt-3"))
    assert info.saver == SaverConfig(max_to_keep=2, keep_checkpoint_every_n_hours=3.0)


def test_manager_cleans_stray_meta_but_keeps_those_of_checkpoints(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    with sync.CheckpointManager(str(directory), write_meta_graph=True) as manager:
        manager.save({"x": np.ones(2)}, step=2).wait()
    (directory / "ckpt-9.meta").write_bytes(b"from an interrupted save")  # newer: never committed
    (directory / "ckpt-1.meta").write_bytes(b"lone, its checkpoint is gone")
    (directory / "ckpt-0").write_bytes(b"an untracked V1 checkpoint file")
    (directory / "ckpt-0.meta").write_bytes(b"its graph")
    with sync.CheckpointManager(str(directory), write_meta_graph=True):
        pass
    assert sorted(os.listdir(directory)) == [
        "checkpoint",
        "ckpt-0",
        "ckpt-0.meta",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
        "ckpt-2.meta",
    ]


def test_manager_v1_keeps_meta_of_tracked_checkpoints(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    for _ in range(3):  # reopening must not take a .meta for debris (V1 has no .index)
        with sync.CheckpointManager(str(directory), format="v1", write_meta_graph=True) as m:
            m.save({"x": np.ones(2)}).wait()
    assert sorted(os.listdir(directory)) == [
        "checkpoint",
        *(f"ckpt-{i}{ext}" for i in (1, 2, 3) for ext in ("", ".meta")),
    ]


def test_manager_without_tf_saver_equivalent_refuses_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v2 = anyckpt.get_format("v2")
    monkeypatch.setattr(v2, "tf_saver_version", 0, raising=False)
    with pytest.raises(anyckpt.UnsupportedFormatError):
        anyckpt.CheckpointManager(str(tmp_path), write_meta_graph=True)
    anyckpt.CheckpointManager(str(tmp_path))  # fine without a .meta


def test_copied_fixture_meta_survives_the_manager(tmp_path: Path) -> None:
    """A TF-written directory (Saver with .meta) opened by the manager loses nothing."""
    directory = tmp_path / "tf"
    shutil.copytree(
        FIXTURES / "v2_max_to_keep", directory, ignore=shutil.ignore_patterns("expected")
    )
    before = sorted(os.listdir(directory))
    with sync.CheckpointManager(str(directory), checkpoint_name="model.ckpt"):
        pass
    assert sorted(os.listdir(directory)) == before


# -- hostile .meta files (issue 13, defect 3) ------------------------------------------------


def test_a_const_bomb_is_read_in_constant_memory(tmp_path: Path) -> None:
    """String Consts of shape [2^24] storing one value each (TensorFlow repeats the last
    value), read by 100 Assign nodes: once a 16M-element list per node, now one value each."""
    import tracemalloc

    from hostile_cases import meta_const_bomb_bytes

    data = meta_const_bomb_bytes(1 << 24, assigns=100)
    assert len(data) < 8192
    tracemalloc.start()
    try:
        info = decode_meta_graph(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert len(info.variables) == 100
    assert {(v.checkpoint_key, v.slice_spec) for v in info.variables} == {("w", "")}
    (tmp_path / "m.meta").write_bytes(data)
    assert sync.read_meta_graph(tmp_path / "m.meta").variable("v99").checkpoint_key == "w"


def _restore_graph(values: list[bytes], dims: list[int], index: int) -> bytes:
    meta = MetaGraphDef()
    const = meta.graph_def.node.add(name="save/names", op="Const")
    tensor = const.attr["value"].tensor
    tensor.dtype = 7
    for d in dims:
        tensor.tensor_shape.dim.add(size=d)
    tensor.string_val.extend(values)
    meta.graph_def.node.add(name="save/RestoreV2", op="RestoreV2").input.extend(
        ["save/Const", "save/names", "save/names"]
    )
    meta.graph_def.node.add(name="v", op="VariableV2")
    meta.graph_def.node.add(name="save/Assign", op="Assign").input.extend(
        ["v", f"save/RestoreV2:{index}"]
    )
    meta.saver_def.restore_op_name = "save/restore_all"
    return meta.SerializeToString()


@given(
    values=st.lists(st.binary(max_size=4), max_size=4),
    dims=st.lists(st.integers(-2, 1 << 40), max_size=3),
    index=st.integers(0, 1 << 41),
)
def test_const_fill_rule(values: list[bytes], dims: list[int], index: int) -> None:
    """A Const's element ``index`` is its stored value there, else the last stored value while
    ``index`` is below the element count (TensorFlow's fill rule), else nothing."""
    count = 1
    for d in dims:
        count *= max(d, 0)
    length = count if values and count > len(values) else len(values)
    expected = None
    if index < length:
        expected = values[min(index, len(values) - 1)].decode("utf-8", "surrogateescape")
    (var,) = decode_meta_graph(_restore_graph(values, dims, index)).variables
    assert var.checkpoint_key == expected
    assert var.slice_spec == (expected or "")


def _identity_chain_graph(chain: int, assigns: int, cycle: bool = False) -> MetaGraphDef:
    meta = MetaGraphDef()
    nodes = meta.graph_def.node
    const = nodes.add(name="save/names", op="Const")
    const.attr["value"].tensor.dtype = 7
    const.attr["value"].tensor.string_val.append(b"w")
    nodes.add(name="save/RestoreV2", op="RestoreV2").input.extend(["p", "save/names", "s"])
    previous = "save/RestoreV2"
    for i in range(chain):
        nodes.add(name=f"save/id{i}", op="Identity").input.append(previous)
        previous = f"save/id{i}"
    if cycle:
        nodes[3].input[0] = previous  # save/id0 now reads the last Identity
    for i in range(assigns):
        nodes.add(name=f"v{i}", op="VariableV2")
        nodes.add(name=f"save/Assign_{i}", op="Assign").input.extend([f"v{i}", previous])
    return meta


class _CountingNodes(dict[str, NodeDef]):
    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        type(self).lookups += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> NodeDef:
        type(self).lookups += 1
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        type(self).lookups += 1
        return super().__contains__(key)


def test_identity_chains_are_followed_once_per_node() -> None:
    """Many Assigns behind one long Identity chain: each Identity is followed once (it was
    up to 100 times per Assign: 29 s for a 2.6 MB file of 100,000 Assigns)."""
    from anyckpt.meta import _restore_sources

    meta = _identity_chain_graph(chain=90, assigns=2000)
    nodes = _CountingNodes({n.name: n for n in meta.graph_def.node})
    _CountingNodes.lookups = 0
    sources = _restore_sources(
        nodes.get, [n for n in meta.graph_def.node if n.op == "Assign"], "save"
    )
    assert sources == {f"v{i}": ("w", "") for i in range(2000)}
    assert _CountingNodes.lookups <= 4 * len(nodes), _CountingNodes.lookups
    long = decode_meta_graph(_identity_chain_graph(150, 2).SerializeToString())
    assert [v.checkpoint_key for v in long.variables] == ["w", "w"]  # no 100-hop cut-off
    cyclic = decode_meta_graph(_identity_chain_graph(10, 3, cycle=True).SerializeToString())
    assert [v.checkpoint_key for v in cyclic.variables] == [None] * 3


_TF_METAS = sorted(FIXTURES.rglob("*.meta"))


@pytest.mark.parametrize("path", _TF_METAS, ids=[p.parent.name + "/" + p.name for p in _TF_METAS])
def test_node_by_node_reading_equals_the_whole_message(path: Path) -> None:
    """The binary graph read one node at a time (never built whole) says exactly what the
    whole parsed MetaGraphDef says, on every TensorFlow-written .meta of the corpus."""
    from anyckpt.meta import _BinaryGraph, _info_of_message

    data = path.read_bytes()
    streamed = _BinaryGraph(data).info()
    assert streamed == _info_of_message(MetaGraphDef.FromString(data))
    assert streamed.variables
    assert streamed.saver is not None
    assert all(v.checkpoint_key for v in streamed.variables)


def test_a_graph_split_over_repeated_fields_is_merged_as_protobuf_does() -> None:
    """graph_def, saver_def and meta_info_def given twice on the wire are merged (nodes
    concatenated, scalars: the last wins), collection map entries: the last wins."""
    meta = _identity_chain_graph(chain=3, assigns=4)
    meta.collection_def["c"].node_list.value.append("first")
    data = meta.SerializeToString()
    extra = MetaGraphDef()
    extra.graph_def.node.add(name="v_extra", op="VariableV2")
    extra.meta_info_def.tensorflow_version = "9.9"
    extra.collection_def["c"].node_list.value.append("second")
    both = data + extra.SerializeToString()
    decoded = decode_meta_graph(both)
    whole = MetaGraphDef.FromString(both)
    assert [n.name for n in whole.graph_def.node][-1] == "v_extra"
    from anyckpt.meta import _info_of_message

    assert decoded == _info_of_message(whole)
    assert decoded.tensorflow_version == "9.9"
    assert decoded.collections["c"] == ("second",)

"""TensorFlow's ``PREFIX.meta``: a ``MetaGraphDef`` built for a set of tensors, and parsed back.

Sans-I/O: :func:`build_meta_graph` / :func:`encode_meta_graph` turn tensor specs and a
:class:`SaverConfig` into the graph ``tf.compat.v1.train.Saver`` would have exported, so that
``tf.compat.v1.train.import_meta_graph(PREFIX + ".meta")`` followed by ``saver.restore(sess,
PREFIX)`` restores the checkpoint in TensorFlow. :func:`decode_meta_graph` lists a ``.meta``
file's variables (with the checkpoint key each one is restored from), its ``saver_def`` and its
collections. Decoders raise :class:`anyckpt.codecs.DecodeError`; the I/O layer names the file.

The graph mirrors TensorFlow 2.21's Saver (checked against TF-written fixtures): per variable
``NAME/Initializer/zeros`` (Const), ``NAME`` (VariableV2), ``NAME/Assign`` and ``NAME/read``;
then the ``save/`` scope with the ``save/Const`` filename tensor, ``SaveV2`` (``SaveSlices`` for
V1) and ``save/control_dependency``, or the sharded form (``ShardedFilename`` per shard,
``MergeV2Checkpoints`` and ``save/Identity`` for V2, ``ShardedFilespec`` for V1), and
``RestoreV2`` with one ``save/Assign_k`` per variable under ``save/restore_all``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from google.protobuf import message as _message
from google.protobuf import text_format

from ._proto.attr_value_pb2 import AttrValue
from ._proto.graph_pb2 import GraphDef
from ._proto.meta_graph_pb2 import CollectionDef, MetaGraphDef
from ._proto.node_def_pb2 import NodeDef
from ._proto.saver_pb2 import SaverDef
from ._proto.tensor_pb2 import TensorProto
from ._proto.tensor_shape_pb2 import TensorShapeProto
from ._proto.variable_pb2 import VariableDef
from .codecs import DecodeError
from .codecs.dtypes import DT_STRING, dtype_from_enum, enum_from_dtype, tf_name
from .codecs.protowire import LENGTH_DELIMITED, fields, last_string
from .errors import UnsupportedFormatError
from .formats.base import tf_saver_version

#: SaverDef.CheckpointFormatVersion values (``SaverDef.V1``, ``SaverDef.V2``).
V1: int = 1
V2: int = 2
#: TensorFlow's Saver default for ``keep_checkpoint_every_n_hours``: in effect "never".
TF_KEEP_HOURS_NEVER = 10000.0
#: ``graph_def.versions.producer``: the GraphDef version of TensorFlow 2.21, whose Saver
#: graph this module reproduces. TensorFlow accepts any producer >= 0 (only ``min_consumer``
#: limits which versions may read a graph, and we leave it at 0).
GRAPH_PRODUCER = 2474
#: Largest ``.meta`` file we agree to parse (protobuf's own limit is 2 GiB).
MAX_META_BYTES = (1 << 31) - 1
#: Element counts of Const tensors are clamped here (an int64 dimension product).
_MAX_ELEMENTS = (1 << 63) - 1

DT_INT32 = 3
_CPU0 = "/device:CPU:0"
_CPU_ANY = "/device:CPU:*"
#: Collections whose bytes_list holds VariableDef protos (TensorFlow's _VARIABLE_COLLECTIONS).
VARIABLE_COLLECTIONS = frozenset(
    {
        "variables",
        "local_variables",
        "metric_variables",
        "model_variables",
        "trainable_variables",
        "moving_average_variables",
        "concatenated_variables",
        "trainable_resource_variables",
    }
)
_VARIABLE_OPS = frozenset({"VariableV2", "Variable", "VarHandleOp"})
_ASSIGN_OPS = frozenset({"Assign", "AssignVariableOp"})
#: Restore ops: input index of tensor_names and of shape_and_slices (None: whole tensors).
_RESTORE_OPS: dict[str, tuple[int, int | None]] = {
    "RestoreV2": (1, 2),
    "RestoreSlice": (1, 2),
    "Restore": (1, None),
}
_FORMAT_VERSIONS = {"v1": V1, "v2": V2, "sharded": V2}
#: Dtypes TensorFlow's CPU ``Assign`` kernel handles (checked on TF 2.21): float8 and int4
#: variables cannot be restored through a Saver graph, so they get no ``.meta``.
_ASSIGNABLE = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 17, 18, 19, 22, 23})
_BAD_NAME_CHAR = re.compile(r"[^A-Za-z0-9_.\->]")


class TensorLike(Protocol):
    """Anything with a NumPy ``dtype`` and a ``shape``: arrays, :class:`~anyckpt.TensorSpec`."""

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


# -- the SaverDef ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SaverConfig:
    """TensorFlow's ``SaverDef``, field for field, in the manager's terms.

    ``max_to_keep`` None is SaverDef 0 (keep all); ``keep_checkpoint_every_n_hours`` None is
    SaverDef 10000 (TensorFlow's default, in effect never); ``version`` is ``V1`` (format
    ``"v1"``) or ``V2`` (``"v2"``); ``sharded`` is whether the save graph writes one shard
    per group of variables. The three names locate the save/restore subgraph in the graph.
    """

    max_to_keep: int | None = 5
    keep_checkpoint_every_n_hours: float | None = None
    sharded: bool = False
    version: int = V2
    filename_tensor_name: str = "save/Const:0"
    save_tensor_name: str = "save/control_dependency:0"
    restore_op_name: str = "save/restore_all"

    def to_proto(self) -> SaverDef:
        hours = self.keep_checkpoint_every_n_hours
        return SaverDef(
            filename_tensor_name=self.filename_tensor_name,
            save_tensor_name=self.save_tensor_name,
            restore_op_name=self.restore_op_name,
            max_to_keep=self.max_to_keep or 0,
            sharded=self.sharded,
            keep_checkpoint_every_n_hours=TF_KEEP_HOURS_NEVER if hours is None else hours,
            version=self.version,  # type: ignore[arg-type]
        )

    @classmethod
    def from_proto(cls, proto: SaverDef) -> SaverConfig:
        hours = float(proto.keep_checkpoint_every_n_hours)
        return cls(
            max_to_keep=proto.max_to_keep if proto.max_to_keep > 0 else None,
            keep_checkpoint_every_n_hours=None if hours >= TF_KEEP_HOURS_NEVER else hours,
            sharded=proto.sharded,
            version=int(proto.version),
            filename_tensor_name=proto.filename_tensor_name,
            save_tensor_name=proto.save_tensor_name,
            restore_op_name=proto.restore_op_name,
        )

    @classmethod
    def for_format(
        cls,
        format: str | Any,
        *,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        sharded: bool = False,
    ) -> SaverConfig:
        """The SaverDef of a checkpoint written in ``format`` (a name or format object) by a
        manager with this retention policy."""
        return cls(
            max_to_keep=max_to_keep,
            keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
            sharded=sharded,
            version=saver_version(format),
        )

    def manager_kwargs(self) -> dict[str, Any]:
        """The :class:`~anyckpt.CheckpointManager` arguments this SaverDef stands for."""
        if self.version not in (V1, V2):
            raise UnsupportedFormatError(f"SaverDef version {self.version} has no anyckpt format")
        return {
            "max_to_keep": self.max_to_keep,
            "keep_checkpoint_every_n_hours": self.keep_checkpoint_every_n_hours,
            "format": "v1" if self.version == V1 else "v2",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_to_keep": self.max_to_keep,
            "keep_checkpoint_every_n_hours": self.keep_checkpoint_every_n_hours,
            "sharded": self.sharded,
            "version": {V1: "V1", V2: "V2"}.get(self.version, str(self.version)),
            "filename_tensor_name": self.filename_tensor_name,
            "save_tensor_name": self.save_tensor_name,
            "restore_op_name": self.restore_op_name,
        }


def saver_version(format: str | Any) -> int:
    """SaverDef version (``V1``/``V2``) of a format: its ``tf_saver_version`` attribute, else
    by name (``v1``, ``v2``, ``sharded``). Other formats TensorFlow cannot restore."""
    version = None if isinstance(format, str) else tf_saver_version(format)
    name = format if isinstance(format, str) else getattr(format, "name", repr(format))
    if version is None:
        version = _FORMAT_VERSIONS.get(name)
    if version not in (V1, V2):
        raise UnsupportedFormatError(
            f"format {name!r} has no TensorFlow Saver equivalent, so it gets no .meta graph "
            "(use format 'v1' or 'v2')"
        )
    return int(version)


# -- building -------------------------------------------------------------------------------


def _shape_proto(shape: Sequence[int]) -> TensorShapeProto:
    return TensorShapeProto(dim=[TensorShapeProto.Dim(size=int(d)) for d in shape])


def _strings_tensor(values: Sequence[bytes]) -> TensorProto:
    return TensorProto(
        dtype=DT_STRING,  # type: ignore[arg-type]
        tensor_shape=_shape_proto([len(values)]),
        string_val=list(values),
    )


def _scalar_tensor(dtype: int, value: bytes | int) -> TensorProto:
    proto = TensorProto(dtype=dtype, tensor_shape=TensorShapeProto())  # type: ignore[arg-type]
    if isinstance(value, bytes):
        proto.string_val.append(value)
    else:
        proto.int_val.append(value)
    return proto


class _Graph:
    """A GraphDef under construction, with TensorFlow's unique-name rule (``name_1``...)."""

    def __init__(self) -> None:
        self.graph = GraphDef()
        self.graph.versions.producer = GRAPH_PRODUCER
        self.used: set[str] = set()
        self.sharded = False  # save nodes of a sharded graph are pinned to CPU 0

    def unique_scope(self, name: str) -> str:
        """``name``, or ``name_1``... : a scope no existing node is named or nested in."""
        candidate, i = name, 0
        while candidate in self.used or any(n.startswith(f"{candidate}/") for n in self.used):
            i += 1
            candidate = f"{name}_{i}"
        return candidate

    def unique(self, name: str) -> str:
        candidate, i = name, 0
        while candidate in self.used:
            i += 1
            candidate = f"{name}_{i}"
        return candidate

    def add(
        self,
        name: str,
        op: str,
        inputs: Iterable[str] = (),
        *,
        device: str = "",
        control: Iterable[str] = (),
        **attrs: AttrValue,
    ) -> str:
        if name in self.used:
            raise AssertionError(f"duplicate node name {name}")  # a bug here, not bad input
        self.used.add(name)
        node = self.graph.node.add(name=name, op=op, device=device)
        node.input.extend(inputs)
        node.input.extend(sorted(f"^{c}" for c in control))  # as TensorFlow serializes them
        for key in sorted(attrs):
            node.attr[key].CopyFrom(attrs[key])
        return name

    def const(self, name: str, tensor: TensorProto, device: str = "") -> str:
        return self.add(
            name,
            "Const",
            device=device,
            value=AttrValue(tensor=tensor),
            dtype=AttrValue(type=tensor.dtype),
        )


def _type(enum: int) -> AttrValue:
    return AttrValue(type=enum)  # type: ignore[arg-type]


def _types(enums: Iterable[int]) -> AttrValue:
    return AttrValue(list=AttrValue.ListValue(type=list(enums)))  # type: ignore[arg-type]


def _colocate(name: str) -> AttrValue:
    return AttrValue(list=AttrValue.ListValue(s=[f"loc:@{name}".encode()]))


def _output(name: str, index: int) -> str:
    return name if index == 0 else f"{name}:{index}"


def sanitize_op_name(key: str) -> str:
    """A TensorFlow op name for a checkpoint key: ``/``-separated parts, each character outside
    ``[A-Za-z0-9_.->]`` replaced by ``_``, empty parts dropped; the first character must be a
    letter, digit or ``.`` (else ``v`` is prepended)."""
    parts = [_BAD_NAME_CHAR.sub("_", p) for p in key.split("/") if p]
    name = "/".join(parts) or "v"
    return name if re.match(r"[A-Za-z0-9.]", name) else f"v{name}"


@dataclass(frozen=True)
class _Var:
    """One saveable: a whole tensor, or one partition of a partitioned tensor."""

    key: str
    name: str
    dtype: int
    shape: tuple[int, ...]
    slice_spec: str = ""  # TensorFlow's "full dims off,len:off,len" for a partition
    full_name: str = ""
    full_shape: tuple[int, ...] = ()
    offset: tuple[int, ...] = ()

    @property
    def save_input(self) -> str:
        # TensorFlow saves a whole variable from its ref, a partition from its snapshot.
        return f"{self.name}/read" if self.slice_spec else self.name


def _nodes_of(name: str, num_partitions: int) -> list[str]:
    """The node names a variable (or each of its partitions) creates, plus its own name."""
    if num_partitions:
        parts = (_nodes_of(f"{name}/part_{i}", 0) for i in range(num_partitions))
        return [name, *(n for nodes in parts for n in nodes)]
    return [name, f"{name}/Assign", f"{name}/read", f"{name}/Initializer/zeros"]


def _variable_names(keys: Sequence[str], num_partitions: Mapping[str, int]) -> dict[str, str]:
    """One op name per key (:func:`sanitize_op_name`, then ``_1``, ``_2``... as TensorFlow
    uniquifies) such that no two variables' nodes share a name."""
    taken: set[str] = set()
    names: dict[str, str] = {}
    for key in keys:
        base = sanitize_op_name(key)
        candidate, i = base, 0
        while any(n in taken for n in _nodes_of(candidate, num_partitions[key])):
            i += 1
            candidate = f"{base}_{i}"
        taken.update(_nodes_of(candidate, num_partitions[key]))
        names[key] = candidate
    return names


def _partitions(spec: TensorLike, shape: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
    """Explicit (start, length) extents of each stored partition (none for a whole tensor):
    from :class:`~anyckpt.Partitioned` or a reader's :class:`~anyckpt.TensorSpec`."""
    out = []
    for part in getattr(spec, "partitions", None) or ():
        extents = tuple(getattr(part, "extents", part))
        if len(extents) != len(shape):
            raise ValueError(f"partition {extents} does not have the rank of {shape}")
        out.append(
            tuple(
                (0, dim) if int(n) == -1 else (int(start), int(n))
                for (start, n), dim in zip(extents, shape, strict=True)
            )
        )
    return out


def _saveables(key: str, name: str, spec: TensorLike) -> list[_Var]:
    try:
        enum = enum_from_dtype(np.dtype(spec.dtype))
    except TypeError as exc:
        raise UnsupportedFormatError(f"{key!r}: {exc}") from None
    if enum not in _ASSIGNABLE:
        raise UnsupportedFormatError(
            f"{key!r}: TensorFlow cannot assign a {tf_name(enum)} variable (no CPU kernel), "
            "so a .meta graph could not restore it"
        )
    shape = tuple(int(d) for d in spec.shape)
    parts = _partitions(spec, shape)
    if not parts:
        return [_Var(key, name, enum, shape)]
    dims = " ".join(str(d) for d in shape)
    return [
        _Var(
            key,
            f"{name}/part_{i}",
            enum,
            tuple(n for _, n in extents),
            f"{dims} " + ":".join(f"{start},{n}" for start, n in extents),
            name,
            shape,
            tuple(start for start, _ in extents),
        )
        for i, extents in enumerate(parts)
    ]


def _add_variable(g: _Graph, var: _Var) -> bytes:
    """The variable's nodes as tf.compat.v1.Variable builds them; returns its VariableDef."""
    zeros = TensorProto(dtype=var.dtype, tensor_shape=_shape_proto(var.shape))  # type: ignore[arg-type]
    # A Const with a shape and no values is all zeros (empty strings): TensorFlow fills the
    # missing elements, so the initializer is a few bytes whatever the size of the variable.
    init = g.const(f"{var.name}/Initializer/zeros", zeros, _CPU0)
    g.graph.node[-1].attr["_class"].CopyFrom(_colocate(var.name))
    g.add(
        var.name,
        "VariableV2",
        device=_CPU0,
        dtype=_type(var.dtype),
        shape=AttrValue(shape=_shape_proto(var.shape)),
    )
    assign = g.add(
        f"{var.name}/Assign",
        "Assign",
        [var.name, init],
        device=_CPU0,
        T=_type(var.dtype),
        _class=_colocate(var.name),
    )
    read = g.add(
        f"{var.name}/read",
        "Identity",
        [var.name],
        device=_CPU0,
        T=_type(var.dtype),
        _class=_colocate(var.name),
    )
    proto = VariableDef(
        variable_name=f"{var.name}:0",
        initial_value_name=f"{init}:0",
        initializer_name=assign,
        snapshot_name=f"{read}:0",
        trainable=True,
    )
    if var.slice_spec:
        info = proto.save_slice_info_def
        info.full_name = var.full_name
        info.full_shape.extend(var.full_shape)
        info.var_offset.extend(var.offset)
        info.var_shape.extend(var.shape)
    return proto.SerializeToString(deterministic=True)


def _names_consts(
    g: _Graph, scope: str, names_input: str, slices_input: str, group: Sequence[_Var], device: str
) -> tuple[str, str]:
    names = g.const(
        f"{scope}/{names_input}",
        _strings_tensor([v.key.encode("utf-8", "surrogateescape") for v in group]),
        device,
    )
    specs = [v.slice_spec.encode() for v in group]
    slices = g.const(f"{scope}/{slices_input}", _strings_tensor(specs), device)
    return names, slices


def _add_save(g: _Graph, scope: str, filename: str, group: Sequence[_Var], version: int) -> str:
    """``SaveV2`` (or V1 ``SaveSlices``) of ``group`` to ``filename`` and its
    ``control_dependency``; returns the latter."""
    device = _CPU0 if g.sharded else ""
    if version == V1:
        op_name = g.unique(f"{scope}/save")
        names, slices = _names_consts(
            g, op_name, "tensor_names", "shapes_and_slices", group, device
        )
        save = g.add(
            op_name,
            "SaveSlices",
            [filename, names, slices, *(v.save_input for v in group)],
            device=device,
            T=_types(v.dtype for v in group),
        )
    else:
        op_name = g.unique(f"{scope}/SaveV2")
        names, slices = _names_consts(g, op_name, "tensor_names", "shape_and_slices", group, device)
        save = g.add(
            op_name,
            "SaveV2",
            [filename, names, slices, *(v.save_input for v in group)],
            device=device,
            dtypes=_types(v.dtype for v in group),
        )
    return g.add(
        g.unique(f"{scope}/control_dependency"),
        "Identity",
        [filename],
        device=device,
        control=[save],
        T=_type(DT_STRING),
        _class=_colocate(filename),
    )


def _add_restore(
    g: _Graph, scope: str, filename: str, group: Sequence[_Var], counter: list[int]
) -> list[str]:
    """One ``RestoreV2`` for ``group`` (on CPU 0, as TensorFlow's bulk restore) and an
    ``Assign`` per variable; returns the assign names."""
    op_name = g.unique(f"{scope}/RestoreV2")
    names, slices = _names_consts(g, op_name, "tensor_names", "shape_and_slices", group, _CPU0)
    restore = g.add(
        op_name,
        "RestoreV2",
        [filename, names, slices],
        device=_CPU0,
        dtypes=_types(v.dtype for v in group),
    )
    assigns = []
    for i, var in enumerate(group):
        k = counter[0]
        counter[0] += 1
        assigns.append(
            g.add(
                f"{scope}/Assign" if k == 0 else f"{scope}/Assign_{k}",
                "Assign",
                [var.name, _output(restore, i)],
                device=_CPU0,
                T=_type(var.dtype),
                _class=_colocate(var.name),
            )
        )
    return assigns


def _add_saver(
    g: _Graph, groups: Sequence[Sequence[_Var]], version: int, sharded: bool
) -> tuple[str, str, str]:
    """TensorFlow's save/restore subgraph; returns (filename tensor, save tensor, restore op)."""
    scope = g.unique_scope("save")
    g.sharded = sharded
    string = _type(DT_STRING)
    scalar = AttrValue(shape=TensorShapeProto())
    default = g.const(f"{scope}/filename/input", _scalar_tensor(DT_STRING, b"model"))
    name = g.add(
        f"{scope}/filename", "PlaceholderWithDefault", [default], dtype=string, shape=scalar
    )
    # Keeps the name "Const" from older TensorFlow: SaverDef.filename_tensor_name is save/Const:0.
    filename = g.add(f"{scope}/Const", "PlaceholderWithDefault", [name], dtype=string, shape=scalar)
    counter = [0]
    if not sharded:
        [group] = groups
        save = _add_save(g, scope, filename, group, version)
        assigns = _add_restore(g, scope, filename, group, counter)
        restore_all = g.add(f"{scope}/restore_all", "NoOp", device=_CPU0, control=assigns)
        return f"{filename}:0", f"{save}:0", restore_all

    if version == V1:
        base = filename  # V1 shards are PREFIX-0000i-of-0000n
    else:  # V2 shards go to a temporary directory and are merged into PREFIX
        is_s3 = g.add(
            f"{scope}/StaticRegexFullMatch",
            "StaticRegexFullMatch",
            [filename],
            device=_CPU_ANY,
            pattern=AttrValue(s=b"^s3://.*"),
        )
        part = g.const(f"{scope}/Const_1", _scalar_tensor(DT_STRING, b".part"), _CPU_ANY)
        temp = g.const(f"{scope}/Const_2", _scalar_tensor(DT_STRING, b"_temp/part"), _CPU_ANY)
        suffix = g.add(f"{scope}/Select", "Select", [is_s3, part, temp], device=_CPU_ANY, T=string)
        base = g.add(
            f"{scope}/StringJoin",
            "StringJoin",
            [filename, suffix],
            device=_CPU_ANY,
            N=AttrValue(i=2),
        )
    num_shards = g.const(f"{scope}/num_shards", _scalar_tensor(DT_INT32, len(groups)))
    shard_files, saved = [], []
    for i, group in enumerate(groups):
        sharded_name = g.unique(f"{scope}/ShardedFilename")
        shard = g.const(f"{sharded_name}/shard", _scalar_tensor(DT_INT32, i), _CPU0)
        shard_files.append(
            g.add(sharded_name, "ShardedFilename", [base, shard, num_shards], device=_CPU0)
        )
        saved.append(_add_save(g, scope, shard_files[-1], group, version))
    if version == V1:
        save = g.add(
            f"{scope}/ShardedFilespec", "ShardedFilespec", [filename, num_shards], control=saved
        )
    else:
        prefixes = g.add(
            f"{scope}/MergeV2Checkpoints/checkpoint_prefixes",
            "Pack",
            shard_files,
            device=_CPU0,
            control=saved,
            N=AttrValue(i=len(shard_files)),
            T=string,
        )
        merge = g.add(
            f"{scope}/MergeV2Checkpoints",
            "MergeV2Checkpoints",
            [prefixes, filename],
            device=_CPU0,
            delete_old_dirs=AttrValue(b=True),
        )
        save = g.add(
            f"{scope}/Identity",
            "Identity",
            [filename],
            device=_CPU0,
            control=[merge, *saved],
            T=string,
        )
    shard_ops = []
    for group in groups:
        assigns = _add_restore(g, scope, filename, group, counter)
        shard_ops.append(
            g.add(g.unique(f"{scope}/restore_shard"), "NoOp", device=_CPU0, control=assigns)
        )
    per_device = [
        g.add(g.unique(f"{scope}/restore_all/NoOp"), "NoOp", device=_CPU0, control=[op])
        for op in shard_ops
    ]
    restore_all = g.add(f"{scope}/restore_all", "NoOp", control=per_device)
    return f"{filename}:0", f"{save}:0", restore_all


def build_meta_graph(
    tensors: Mapping[str, TensorLike],
    saver: SaverConfig | None = None,
    *,
    shards: Sequence[Sequence[str]] | None = None,
    tags: Sequence[str] = (),
    meta_graph_version: str | None = None,
) -> MetaGraphDef:
    """The ``MetaGraphDef`` TensorFlow's Saver exports for variables holding ``tensors``.

    ``tensors`` maps checkpoint keys to anything with ``dtype`` and ``shape``. ``shards``
    groups the keys into the shards of a sharded save (every key exactly once); more than one
    group makes the save graph sharded. ``saver`` supplies retention and the format version;
    its tensor/op names are replaced by those of the graph built here. ``meta_graph_version``
    defaults to ``"anyckpt <version>"``.
    """
    saver = saver or SaverConfig()
    if saver.version not in (V1, V2):
        raise ValueError(f"SaverDef version must be V1 or V2, not {saver.version}")
    keys = sorted(tensors, key=lambda k: k.encode("utf-8", "surrogateescape"))
    if not keys:
        raise ValueError("a meta graph needs at least one tensor")
    names = _variable_names(
        keys, {k: len(getattr(tensors[k], "partitions", None) or ()) for k in keys}
    )
    saveables = {key: _saveables(key, names[key], tensors[key]) for key in keys}

    groups_keys = [list(keys)] if shards is None else [list(s) for s in shards if s]
    flat = [k for s in groups_keys for k in s]
    if sorted(flat) != sorted(keys) or len(set(flat)) != len(flat):
        raise ValueError("shards must hold every key exactly once")
    order = {k: i for i, k in enumerate(keys)}
    groups = [
        [var for key in sorted(s, key=order.__getitem__) for var in saveables[key]]
        for s in groups_keys
    ]
    sharded = saver.sharded or len(groups) > 1

    g = _Graph()
    var_defs = [_add_variable(g, var) for key in keys for var in saveables[key]]
    filename, save, restore = _add_saver(g, groups, saver.version, sharded)

    meta = MetaGraphDef()
    if meta_graph_version is None:
        from ._version import __version__

        meta_graph_version = f"anyckpt {__version__}"
    meta.meta_info_def.meta_graph_version = meta_graph_version
    meta.meta_info_def.tags.extend(tags)
    meta.graph_def.CopyFrom(g.graph)
    saver_def = replace(
        saver,
        sharded=sharded,
        filename_tensor_name=filename,
        save_tensor_name=save,
        restore_op_name=restore,
    )
    meta.saver_def.CopyFrom(saver_def.to_proto())
    for collection in ("variables", "trainable_variables"):
        meta.collection_def[collection].bytes_list.value.extend(var_defs)
    return meta


def encode_meta_graph(
    tensors: Mapping[str, TensorLike],
    saver: SaverConfig | None = None,
    *,
    shards: Sequence[Sequence[str]] | None = None,
    tags: Sequence[str] = (),
    meta_graph_version: str | None = None,
) -> bytes:
    """:func:`build_meta_graph`, serialized (deterministically) as the ``.meta`` file's bytes."""
    meta = build_meta_graph(
        tensors, saver, shards=shards, tags=tags, meta_graph_version=meta_graph_version
    )
    return meta.SerializeToString(deterministic=True)


# -- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaVariable:
    """One variable of a meta graph, and where the Saver restores it from."""

    name: str
    dtype_enum: int
    #: None for an unknown rank; -1 for an unknown dimension.
    shape: tuple[int, ...] | None
    op: str = "VariableV2"
    device: str = ""
    trainable: bool = False
    #: The checkpoint key the saver's restore op assigns to this variable (None if none).
    checkpoint_key: str | None = None
    #: TensorFlow's slice spec for a partition (``"6 2 0,2:0,2"``); ``""`` for the whole.
    slice_spec: str = ""

    @property
    def dtype_name(self) -> str:
        """TensorFlow's name for the dtype (``float32``, ``string``...)."""
        return tf_name(self.dtype_enum)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The NumPy dtype (raises UnsupportedFormatError for one anyckpt cannot hold)."""
        return dtype_from_enum(self.dtype_enum)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype_name,
            "shape": None if self.shape is None else list(self.shape),
            "op": self.op,
            "device": self.device,
            "trainable": self.trainable,
            "checkpoint_key": self.checkpoint_key,
            "slice_spec": self.slice_spec,
        }


CollectionItem = str | int | float


@dataclass(frozen=True)
class MetaGraphInfo:
    """What a ``.meta`` file says: see :func:`decode_meta_graph`."""

    variables: tuple[MetaVariable, ...]
    saver: SaverConfig | None
    #: Collection name -> items: variable names (``w:0``) for variable collections,
    #: node names, ints, floats, or ``type_url``/``<N bytes>`` placeholders for opaque items.
    collections: Mapping[str, tuple[CollectionItem, ...]] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    tensorflow_version: str = ""
    tensorflow_git_version: str = ""
    meta_graph_version: str = ""
    num_nodes: int = 0

    def variable(self, name: str) -> MetaVariable:
        """The variable with op name ``name``."""
        for var in self.variables:
            if var.name == name:
                return var
        raise KeyError(f"no variable {name!r} in the meta graph")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``anyckpt inspect --json``)."""
        return {
            "tensorflow_version": self.tensorflow_version,
            "tensorflow_git_version": self.tensorflow_git_version,
            "meta_graph_version": self.meta_graph_version,
            "tags": list(self.tags),
            "num_nodes": self.num_nodes,
            "saver_def": None if self.saver is None else self.saver.to_dict(),
            "variables": [v.to_dict() for v in self.variables],
            "collections": {k: list(v) for k, v in self.collections.items()},
        }


def _lines(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _parse_text(data: bytes, problem: str) -> MetaGraphDef:
    """TensorFlow's read_meta_graph_file falls back to the text format (``export(as_text=
    True)``) for bytes that are not a binary MetaGraphDef (``problem`` says why not)."""
    meta = MetaGraphDef()
    try:
        text = bytes(data).decode("utf-8")
        # Lines handed over one at a time: the parser's tokenizer does not split the whole
        # text into a list of lines first (~60 bytes of Python per line).
        text_format.ParseLines(_lines(text), meta)  # type: ignore[attr-defined]  # (not in stubs)
    except (UnicodeDecodeError, text_format.ParseError, RecursionError, ValueError):
        raise DecodeError(problem) from None
    if not meta.ListFields():
        raise DecodeError(problem)
    return meta


def _shape(proto: TensorShapeProto) -> tuple[int, ...] | None:
    if proto.unknown_rank:
        return None
    return tuple(int(d.size) for d in proto.dim)


class _ConstStrings:
    """The string values of a Const node, read one at a time: TensorFlow's fill rule (the
    last stored value repeats up to the element count) without building the filled list, so a
    small ``.meta`` declaring a shape of billions of strings costs nothing."""

    def __init__(self, tensor: TensorProto) -> None:
        self._values = tensor.string_val
        size = 1
        for d in tensor.tensor_shape.dim:
            size = min(size * max(int(d.size), 0), _MAX_ELEMENTS)
        stored = len(self._values)
        #: The element count (TensorFlow's), or the number stored if that is larger.
        self.size = size if stored and size > stored else stored

    def get(self, index: int) -> str | None:
        """Element ``index``, or None past the end."""
        if not 0 <= index < self.size:
            return None
        raw = self._values[min(index, len(self._values) - 1)]
        return raw.decode("utf-8", "surrogateescape")


def _const_strings(node: NodeDef | None) -> _ConstStrings | None:
    """The string values of a Const node (None if ``node`` is not a Const with a value)."""
    if node is None or node.op != "Const" or "value" not in node.attr:
        return None
    return _ConstStrings(node.attr["value"].tensor)


def _split_input(name: str) -> tuple[str, int]:
    """``"op:2"`` -> ("op", 2); ``"op"`` -> ("op", 0); control inputs keep their ``^``."""
    op, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return op, int(index)
    return name, 0


def _restore_sources(
    node_named: Callable[[str], NodeDef | None], assigns: Iterable[NodeDef], scope: str | None
) -> dict[str, tuple[str, str]]:
    """Variable op name -> (checkpoint key, slice spec), from the Saver's restore subgraph:
    each of ``assigns`` (the graph's Assign nodes) followed through Identity nodes to a
    restore op, whose names and slices Consts give the key. ``node_named`` looks a node up."""
    out: dict[str, tuple[str, str]] = {}
    cache: dict[str, _ConstStrings | None] = {}

    def consts(name: str) -> _ConstStrings | None:
        op = _split_input(name)[0]
        if op not in cache:
            cache[op] = _const_strings(node_named(op))
        return cache[op]

    # What each Identity node forwards, once per node whatever the number of Assigns that
    # reach it (None for a cycle): linear in the graph's size.
    forwards: dict[str, tuple[str, int] | None] = {}

    def through_identities(source: str, index: int) -> tuple[str, int] | None:
        path: list[str] = []
        on_path: set[str] = set()
        found: tuple[str, int] | None
        while True:
            if source in forwards:
                found = forwards[source]
                break
            node = node_named(source)
            if node is None or node.op != "Identity" or not node.input:
                found = (source, index)
                break
            if source in on_path:
                found = None
                break
            path.append(source)
            on_path.add(source)
            source, index = _split_input(node.input[0])
        for name in path:
            forwards[name] = found
        return found

    for node in assigns:
        if node.op not in _ASSIGN_OPS or len(node.input) < 2:
            continue
        if scope is not None and not node.name.startswith(f"{scope}/"):
            continue
        found = through_identities(*_split_input(node.input[1]))
        if found is None:
            continue
        source, index = found
        restore = node_named(source)
        if restore is None or restore.op not in _RESTORE_OPS:
            continue
        names_at, slices_at = _RESTORE_OPS[restore.op]
        if len(restore.input) <= max(names_at, slices_at or 0):
            continue
        names = consts(restore.input[names_at])
        slices = consts(restore.input[slices_at]) if slices_at is not None else None
        if restore.op != "RestoreV2":
            index = 0 if index == 0 else -1
        name = names.get(index) if names is not None else None
        if name is None:
            continue
        spec = slices.get(index) if slices is not None else None
        target = _split_input(node.input[0])[0]
        out.setdefault(target, (name, spec or ""))
    return out


def _collection_items(name: str, col: CollectionDef) -> tuple[CollectionItem, ...]:
    kind = col.WhichOneof("kind")
    if kind == "node_list":
        return tuple(col.node_list.value)
    if kind == "int64_list":
        return tuple(int(v) for v in col.int64_list.value)
    if kind == "float_list":
        return tuple(float(v) for v in col.float_list.value)
    if kind == "any_list":
        return tuple(v.type_url for v in col.any_list.value)
    if kind == "bytes_list":
        items: list[CollectionItem] = []
        for raw in col.bytes_list.value:
            if name in VARIABLE_COLLECTIONS:
                var = VariableDef()
                try:
                    var.ParseFromString(raw)
                except (_message.DecodeError, RecursionError, ValueError):
                    raise _BadContent(f"collection {name!r} holds a bad VariableDef") from None
                items.append(var.variable_name)
            else:
                items.append(f"<{len(raw)} bytes>")
        return tuple(items)
    return ()


def decode_meta_graph(data: bytes) -> MetaGraphInfo:
    """Parse a ``.meta`` file (binary, or the text format TF also reads).

    Lists the graph's variables (``VariableV2``/``Variable``/``VarHandleOp`` nodes: name,
    dtype, shape, and the checkpoint key and slice the saver restores each from), the
    ``saver_def``, the collections and ``meta_info_def``. Raises DecodeError for bytes that are
    not a MetaGraphDef.

    A binary graph is read one node at a time (:class:`_BinaryGraph`), never built whole:
    protobuf's in-memory messages take ~56 times their wire size, so a small crafted graph
    would otherwise cost far more memory than its bytes. Only the nodes the answer needs are
    parsed and kept (variables; where the restore path leads, as offsets into ``data``).
    """
    if len(data) > MAX_META_BYTES:
        raise DecodeError(f"meta graph is {len(data)} bytes, over protobuf's 2 GiB limit")
    try:
        return _BinaryGraph(data).info()
    except _BadContent:
        raise  # a MetaGraphDef, with bad content: not a reason to try the text format
    except (DecodeError, _message.DecodeError, RecursionError, ValueError) as exc:
        problem = (
            str(exc) if isinstance(exc, _NotAMetaGraph) else f"not a binary MetaGraphDef ({exc})"
        )
    return _info_of_message(_parse_text(data, problem))


class _NotAMetaGraph(DecodeError):
    """Well-formed protobuf, but no field of a MetaGraphDef."""


class _BadContent(DecodeError):
    """A MetaGraphDef whose content is wrong (a collection's VariableDef)."""


#: The ops the restore path goes through, looked up by name (the others are never needed).
_LOOKED_UP_OPS = frozenset({"Identity", "Const", *_RESTORE_OPS})
#: MetaGraphDef's fields (all messages, or map entries of messages).
_META_INFO, _GRAPH, _SAVER, _COLLECTION = 1, 2, 3, 4
_KNOWN_META_FIELDS = range(1, 8)


class _BinaryGraph:
    """A binary MetaGraphDef read field by field (:mod:`anyckpt.codecs.protowire`). It holds
    ``data`` and, per node the restore path may look up, one int (its offsets); each node is
    parsed when needed. Graphs with duplicate node names (TensorFlow refuses them) resolve a
    name to its first node of an op the restore path follows."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)  # (a slice per node parsed: a copy of that node only)
        self.graphs: list[tuple[int, int]] = []
        self.info_def = MetaGraphDef.MetaInfoDef()
        self.saver: SaverDef | None = None
        self.collections: dict[bytes, tuple[int, int] | None] = {}
        known = False
        for number, wire, a, b in fields(self.data):
            if wire != LENGTH_DELIMITED or number not in _KNOWN_META_FIELDS:
                continue  # an unknown field (or a known one with another wire type: unknown)
            known = True
            if number == _META_INFO:
                self.info_def.MergeFromString(self.data[a:b])
            elif number == _GRAPH:
                self.graphs.append((a, b))
            elif number == _SAVER:
                if self.saver is None:
                    self.saver = SaverDef()
                self.saver.MergeFromString(self.data[a:b])
            elif number == _COLLECTION:  # a map entry: key 1, value 2; the last entry wins
                key = last_string(self.data, a, b, 1) or b""
                value: tuple[int, int] | None = None
                for field_number, field_wire, va, vb in fields(self.data, a, b):
                    if field_number == 2 and field_wire == LENGTH_DELIMITED:
                        value = (va, vb)  # (merging repeated values: not for a map entry)
                self.collections[key] = value
        if not known:
            raise _NotAMetaGraph("no MetaGraphDef field is set")
        self.by_name: dict[str, int] = {}  # name -> start << 32 | end, for _LOOKED_UP_OPS

    def nodes(self) -> Iterator[tuple[int, int]]:
        """Each NodeDef's offsets, in graph order."""
        for a, b in self.graphs:
            for number, wire, na, nb in fields(self.data, a, b):
                if number == 1 and wire == LENGTH_DELIMITED:
                    yield na, nb

    def node(self, a: int, b: int) -> NodeDef:
        return NodeDef.FromString(self.data[a:b])

    def node_named(self, name: str) -> NodeDef | None:
        where = self.by_name.get(name)
        return None if where is None else self.node(where >> 32, where & 0xFFFFFFFF)

    def _op(self, a: int, b: int) -> str:
        op = last_string(self.data, a, b, 2)
        return "" if op is None else op.decode("utf-8", "surrogateescape")

    def info(self) -> MetaGraphInfo:
        saver = None if self.saver is None else SaverConfig.from_proto(self.saver)
        found: list[NodeDef] = []  # the variable nodes
        count = 0
        for a, b in self.nodes():
            count += 1
            op = self._op(a, b)
            if op in _VARIABLE_OPS:
                found.append(self.node(a, b))
            elif op in _LOOKED_UP_OPS:
                name = self.node(a, b).name
                self.by_name.setdefault(name, a << 32 | b)
        assigns = (self.node(a, b) for a, b in self.nodes() if self._op(a, b) in _ASSIGN_OPS)
        collections: dict[str, CollectionDef] = {}
        for raw_name, where in self.collections.items():
            name = raw_name.decode("utf-8")  # proto3 strings are UTF-8 (as protobuf checks)
            collections[name] = (
                CollectionDef()
                if where is None
                else CollectionDef.FromString(self.data[slice(*where)])
            )
        return _info(saver, found, assigns, collections, self.info_def, count, self.node_named)


def _info_of_message(meta: MetaGraphDef) -> MetaGraphInfo:
    """:class:`MetaGraphInfo` of a whole parsed MetaGraphDef (the text format)."""
    nodes: dict[str, NodeDef] = {}
    for node in meta.graph_def.node:
        nodes.setdefault(node.name, node)
    saver = SaverConfig.from_proto(meta.saver_def) if meta.HasField("saver_def") else None
    variables = [node for node in meta.graph_def.node if node.op in _VARIABLE_OPS]
    return _info(
        saver,
        variables,
        (n for n in nodes.values() if n.op in _ASSIGN_OPS),
        dict(meta.collection_def),
        meta.meta_info_def,
        len(meta.graph_def.node),
        nodes.get,
    )


def _info(
    saver: SaverConfig | None,
    variable_nodes: Sequence[NodeDef],
    assigns: Iterable[NodeDef],
    collection_defs: Mapping[str, CollectionDef],
    info: MetaGraphDef.MetaInfoDef,
    num_nodes: int,
    node_named: Callable[[str], NodeDef | None],
) -> MetaGraphInfo:
    scope = None
    if saver is not None and "/" in saver.restore_op_name:
        scope = saver.restore_op_name.rsplit("/", 1)[0]
    sources = _restore_sources(node_named, assigns, scope)
    collections = {
        name: _collection_items(name, collection_defs[name]) for name in sorted(collection_defs)
    }
    trainable: set[str] = set()
    for name in ("variables", "trainable_variables"):
        if name not in collection_defs:
            continue
        for raw in collection_defs[name].bytes_list.value:
            var = VariableDef.FromString(raw)  # checked above
            if name == "trainable_variables" or var.trainable:
                trainable.add(_split_input(var.variable_name)[0])

    variables = []
    for node in variable_nodes:
        key, spec = sources.get(node.name, (None, ""))
        variables.append(
            MetaVariable(
                name=node.name,
                dtype_enum=int(node.attr["dtype"].type) if "dtype" in node.attr else 0,
                shape=_shape(node.attr["shape"].shape) if "shape" in node.attr else None,
                op=node.op,
                device=node.device,
                trainable=node.name in trainable,
                checkpoint_key=key,
                slice_spec=spec,
            )
        )
    return MetaGraphInfo(
        variables=tuple(variables),
        saver=saver,
        collections=collections,
        tags=tuple(info.tags),
        tensorflow_version=info.tensorflow_version,
        tensorflow_git_version=info.tensorflow_git_version,
        meta_graph_version=info.meta_graph_version,
        num_nodes=num_nodes,
    )


__all__ = [
    "GRAPH_PRODUCER",
    "V1",
    "V2",
    "MetaGraphInfo",
    "MetaVariable",
    "SaverConfig",
    "build_meta_graph",
    "decode_meta_graph",
    "encode_meta_graph",
    "sanitize_op_name",
    "saver_version",
]

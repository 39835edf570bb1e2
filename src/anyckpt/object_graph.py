"""TensorFlow 2's object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``), without TensorFlow.

A ``tf.train.Checkpoint`` stores, next to its tensors, a serialized ``TrackableObjectGraph``:
node 0 is the root object, each node lists its children by local name, the tensors it saved
(its *attributes*, each with its checkpoint key) and, for an optimizer, its slot variables.

Here it is a nested mapping (an :class:`ObjectTree`):

* an object is a mapping from its children's local names to the children;
* a variable (a node whose one attribute is ``VARIABLE_VALUE``) is its array;
* any other attributes of an object are under the key ``".ATTRIBUTES"`` (``{name: array}``);
* a variable with slot variables is ``{".ATTRIBUTES": {"VARIABLE_VALUE": array},
  ".OPTIMIZER_SLOT": {optimizer_path: {slot_name: array}}}`` — the checkpoint keys' own shape
  (``v/.OPTIMIZER_SLOT/opt/m/.ATTRIBUTES/VARIABLE_VALUE``);
* an object reachable by several paths appears once, at the path TensorFlow names it by (the
  first found breadth-first, children in their stored order); ``ObjectTree.aliases`` maps every
  other path to that one.

Paths are TensorFlow's object path strings: local names escaped (``.`` -> ``..``, ``/`` ->
``.S``) and joined by ``/``. This module is pure: bytes and arrays in, bytes and arrays out.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError as ProtoDecodeError

from ._proto.trackable_object_graph_pb2 import TrackableObjectGraph
from .codecs import DecodeError
from .codecs.varint import decode_varint
from .errors import CorruptCheckpointError

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_VALUE = "VARIABLE_VALUE"
ATTRIBUTES = ".ATTRIBUTES"
OPTIMIZER_SLOT = ".OPTIMIZER_SLOT"

#: Bounds on an untrusted object graph (far above any real model's: a large Keras model with
#: its optimizer has a few thousand nodes).
MAX_GRAPH_BYTES = 32 << 20
MAX_NODES = 200_000
MAX_DEPTH = 512

_RESERVED = (ATTRIBUTES, OPTIMIZER_SLOT)


# -- names ------------------------------------------------------------------------------------


def escape_local_name(name: str) -> str:
    """TensorFlow's escaping of one local name in a checkpoint key."""
    return name.replace(".", "..").replace("/", ".S")


def object_path(names: tuple[str, ...] | list[str]) -> str:
    """The object path string of a node reached by these local names."""
    return "/".join(escape_local_name(n) for n in names)


def attribute_key(path: str, name: str) -> str:
    """The checkpoint key of attribute ``name`` of the object at ``path``."""
    return f"{path}/{ATTRIBUTES}/{escape_local_name(name)}"


def slot_path(variable_path: str, optimizer_path: str, slot_name: str) -> str:
    """The object path TensorFlow gives a slot variable."""
    return f"{variable_path}/{OPTIMIZER_SLOT}/{optimizer_path}/{escape_local_name(slot_name)}"


# -- the tree ---------------------------------------------------------------------------------


class ObjectTree(dict[str, Any]):
    """A checkpoint's object graph as a nested mapping (see the module's docstring).

    ``aliases`` maps other paths of shared objects to their path in the tree; ``unattached``
    lists the checkpoint's keys no object names (other than the graph itself); ``graph`` is
    the graph read (``None`` for a tree built by hand). Writing a tree whose variables sit
    where ``graph`` has them reuses ``graph`` unchanged, so TF's own nodes, full names and
    order survive a read-modify-write.
    """

    def __init__(
        self,
        items: Mapping[str, Any] | None = None,
        *,
        aliases: Mapping[str, str] | None = None,
        unattached: list[str] | None = None,
        graph: bytes | None = None,
    ) -> None:
        super().__init__(items or {})
        self.aliases: dict[str, str] = dict(aliases or {})
        self.unattached: list[str] = list(unattached or [])
        self.graph = graph


# -- parsing an untrusted graph ---------------------------------------------------------------


def _count_nodes(data: bytes, limit: int) -> int:
    """Count the top-level ``nodes`` fields without parsing them; stop past ``limit``."""
    pos, count, end = 0, 0, len(data)
    try:
        while pos < end:
            tag, pos = decode_varint(data, pos)
            wire = tag & 7
            if wire == 0:
                _, pos = decode_varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = decode_varint(data, pos)
                pos += length
                if tag >> 3 == 1:
                    count += 1
                    if count > limit:
                        return count
            else:
                raise DecodeError(f"wire type {wire}")
            if pos > end:
                raise DecodeError("truncated field")
    except DecodeError as e:
        raise CorruptCheckpointError(
            f"{OBJECT_GRAPH_KEY} is not a TrackableObjectGraph: {e}"
        ) from None
    return count


def parse_graph(data: bytes) -> TrackableObjectGraph:
    """Parse a serialized ``TrackableObjectGraph`` within this module's bounds."""
    if len(data) > MAX_GRAPH_BYTES:
        raise CorruptCheckpointError(
            f"{OBJECT_GRAPH_KEY} is {len(data)} bytes, over the {MAX_GRAPH_BYTES} allowed"
        )
    count = _count_nodes(data, MAX_NODES)
    if count > MAX_NODES:
        raise CorruptCheckpointError(f"{OBJECT_GRAPH_KEY} has over {MAX_NODES} nodes")
    if count == 0:
        raise CorruptCheckpointError(f"{OBJECT_GRAPH_KEY} has no nodes (no root object)")
    try:
        return TrackableObjectGraph.FromString(data)
    except (ProtoDecodeError, RuntimeError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{OBJECT_GRAPH_KEY} is not a TrackableObjectGraph: {e}"
        ) from None


@dataclass
class Node:
    """One object reachable from the root (or a slot variable), validated."""

    id: int
    path: str  # escaped object path ("" for the root)
    depth: int
    children: list[tuple[str, int]] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)  # name -> checkpoint key
    slots: dict[str, dict[str, int]] = field(default_factory=dict)  # optimizer -> slot -> id

    @property
    def is_leaf(self) -> bool:
        """A plain variable: one ``VARIABLE_VALUE`` attribute, no children, no slots (the
        root is always an object)."""
        only_value = list(self.attributes) == [VARIABLE_VALUE]
        return self.id != 0 and not self.children and not self.slots and only_value


@dataclass
class Layout:
    """A validated object graph: the reachable nodes (breadth-first), slots and aliases."""

    nodes: dict[int, Node]
    aliases: dict[str, str]

    def checkpoint_keys(self) -> list[str]:
        """Every checkpoint key the objects name, in node order."""
        return [k for node in self.nodes.values() for k in node.attributes.values()]


def _bad(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{OBJECT_GRAPH_KEY}: {message}")


def decode_layout(graph: TrackableObjectGraph, keys: set[str] | None = None) -> Layout:
    """Validate ``graph`` (against the checkpoint's ``keys`` if given) and lay it out.

    Raises :class:`CorruptCheckpointError` for child or slot ids out of range, duplicate
    local names, a slot that is not a variable or slots a non-variable, an attribute naming
    a key the checkpoint lacks, or a path deeper than ``MAX_DEPTH``. Cycles are legal (Python
    objects may refer to each other; TensorFlow saves them): a reference back to a visited
    object is an alias.
    """
    protos = graph.nodes
    n = len(protos)
    nodes: dict[int, Node] = {0: Node(0, "", 0)}
    aliases: dict[str, str] = {}
    queue: deque[int] = deque([0])
    while queue:
        node = nodes[queue.popleft()]
        proto = protos[node.id]
        seen: set[str] = set()
        for ref in proto.children:
            name, child = ref.local_name, ref.node_id
            if name in seen:
                raise _bad(f"object {node.path or '(root)'!r} has two children named {name!r}")
            if not name:
                raise _bad(f"object {node.path or '(root)'!r} has a child with an empty name")
            if name in _RESERVED:
                raise _bad(f"object {node.path or '(root)'!r} has a child named {name!r}")
            seen.add(name)
            if not 0 <= child < n:
                raise _bad(f"node {node.id} names child node {child}, out of range (0..{n - 1})")
            path = (
                f"{node.path}/{escape_local_name(name)}" if node.path else escape_local_name(name)
            )
            node.children.append((name, child))
            if child in nodes:
                aliases[path] = nodes[child].path
                continue
            if node.depth + 1 > MAX_DEPTH:
                raise _bad(f"object {path[:200]!r} is deeper than {MAX_DEPTH} levels")
            nodes[child] = Node(child, path, node.depth + 1)
            queue.append(child)
        for attribute in proto.attributes:
            if attribute.name in node.attributes:
                raise _bad(f"object {node.path!r} has two attributes named {attribute.name!r}")
            if keys is not None and attribute.checkpoint_key not in keys:
                raise _bad(
                    f"object {node.path!r} names key {attribute.checkpoint_key!r}, "
                    "which the checkpoint does not have"
                )
            node.attributes[attribute.name] = attribute.checkpoint_key
    _attach_slots(graph, nodes, keys)
    return Layout(nodes, aliases)


def _attach_slots(
    graph: TrackableObjectGraph, nodes: dict[int, Node], keys: set[str] | None
) -> None:
    protos = graph.nodes
    n = len(protos)
    reachable = sorted(nodes)
    for opt_id in reachable:
        optimizer = nodes[opt_id]
        for ref in protos[opt_id].slot_variables:
            var_id, slot_id = ref.original_variable_node_id, ref.slot_variable_node_id
            for what, i in (("variable", var_id), ("slot variable", slot_id)):
                if not 0 <= i < n:
                    raise _bad(f"optimizer node {opt_id} names {what} node {i}, out of range")
            variable = nodes.get(var_id)
            if variable is None:
                continue  # slots of a variable this checkpoint does not save: TF skips them
            if VARIABLE_VALUE not in variable.attributes:
                raise _bad(f"optimizer node {opt_id} has a slot for node {var_id}, not a variable")
            if slot_id in nodes:
                raise _bad(f"slot variable node {slot_id} is also an object or another slot")
            slot = protos[slot_id]
            if slot.children or [a.name for a in slot.attributes] != [VARIABLE_VALUE]:
                raise _bad(f"slot variable node {slot_id} is not a variable")
            key = slot.attributes[0].checkpoint_key
            if keys is not None and key not in keys:
                raise _bad(f"slot variable node {slot_id} names key {key!r}, which is absent")
            if not optimizer.path:
                raise _bad(f"the root object (node {opt_id}) cannot be an optimizer")
            path = slot_path(variable.path, optimizer.path, ref.slot_name)
            node = Node(slot_id, path, variable.depth, attributes={VARIABLE_VALUE: key})
            nodes[slot_id] = node
            by_slot = variable.slots.setdefault(optimizer.path, {})
            if ref.slot_name in by_slot:
                raise _bad(f"variable {variable.path!r} has two {ref.slot_name!r} slots")
            by_slot[ref.slot_name] = slot_id


def build_tree(
    layout: Layout,
    values: Mapping[str, Any],
    *,
    unattached: list[str] | None = None,
    graph: bytes | None = None,
) -> ObjectTree:
    """The nested mapping of ``layout`` holding ``values`` (checkpoint key -> array)."""
    made: dict[int, Any] = {}
    nodes = layout.nodes
    slot_ids = {i for node in nodes.values() for s in node.slots.values() for i in s.values()}
    # Children before parents: reversed breadth-first order of the tree's own nodes.
    order = [i for i in nodes if i not in slot_ids]
    for node_id in reversed(order):
        node = nodes[node_id]
        if node.is_leaf:
            made[node_id] = values[node.attributes[VARIABLE_VALUE]]
            continue
        obj: dict[str, Any] = {}
        for name, child in node.children:
            if nodes[child].path == _child_path(node.path, name):
                obj[name] = made[child]
        if node.attributes:
            obj[ATTRIBUTES] = {name: values[key] for name, key in node.attributes.items()}
        if node.slots:
            obj[OPTIMIZER_SLOT] = {
                opt: {slot: values[nodes[i].attributes[VARIABLE_VALUE]] for slot, i in s.items()}
                for opt, s in node.slots.items()
            }
        made[node_id] = obj
    return ObjectTree(made[0], aliases=layout.aliases, unattached=unattached, graph=graph)


def _child_path(parent: str, name: str) -> str:
    return f"{parent}/{escape_local_name(name)}" if parent else escape_local_name(name)


def decode_tree_layout(data: bytes, keys: set[str] | None = None) -> Layout:
    """Parse and validate serialized graph bytes in one call."""
    return decode_layout(parse_graph(data), keys)


# -- writing ----------------------------------------------------------------------------------


@dataclass
class _Out:
    proto: Any
    path: str
    is_object: bool


def _is_object(value: Any) -> bool:
    return isinstance(value, Mapping)


def _split(obj: Mapping[str, Any], path: str) -> tuple[list[tuple[str, Any]], Mapping[str, Any]]:
    children = []
    for name, value in obj.items():
        if not isinstance(name, str):
            raise TypeError(f"object {path or '(root)'!r}: local names are strings, not {name!r}")
        if name not in _RESERVED:
            children.append((name, value))
    attributes = obj.get(ATTRIBUTES, {})
    if not isinstance(attributes, Mapping):
        raise TypeError(f"object {path or '(root)'!r}: {ATTRIBUTES} must map names to arrays")
    return children, attributes


def encode_tree(
    tree: Mapping[str, Any], *, aliases: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], bytes]:
    """The checkpoint keys -> values and the serialized graph of a nested mapping.

    Nodes are numbered breadth-first from the root, children in mapping order, then the slot
    variables (by optimizer, slot name and variable), as TensorFlow numbers them. A mapping
    that appears twice (the same object) is one node with two references; ``aliases`` (path ->
    path of an object in the tree) adds references too. An :class:`ObjectTree` whose variables
    sit where its ``graph`` has them is written with that graph, unchanged.
    """
    if isinstance(tree, ObjectTree) and tree.graph is not None:
        reused = _reuse_graph(tree)
        if reused is not None:
            return reused
    if aliases is None and isinstance(tree, ObjectTree):
        aliases = tree.aliases
    graph = TrackableObjectGraph()
    values: list[tuple[int, str, Any]] = []  # (node id, key, value)
    ids: dict[int, int] = {}  # id(mapping) -> node id
    by_path: dict[str, int] = {"": 0}
    nodes: list[_Out] = []
    pending: deque[tuple[int, Any]] = deque()

    def add(value: Any, path: str) -> int:
        if _is_object(value) and id(value) in ids:
            return ids[id(value)]
        node_id = len(nodes)
        nodes.append(_Out(graph.nodes.add(), path, _is_object(value)))
        by_path[path] = node_id
        if _is_object(value):
            ids[id(value)] = node_id
            pending.append((node_id, value))
        else:
            _variable(nodes[node_id], node_id, VARIABLE_VALUE, value, values)
        return node_id

    if not _is_object(tree):
        raise TypeError("the root of an object tree is a mapping")
    add(tree, "")
    slot_requests: list[tuple[int, Mapping[str, Any]]] = []
    while pending:
        node_id, obj = pending.popleft()
        out = nodes[node_id]
        children, attributes = _split(obj, out.path)
        for name, child in children:
            child_id = add(child, _child_path(out.path, name))
            out.proto.children.add(node_id=child_id, local_name=name)
        for name, value in attributes.items():
            _variable(out, node_id, str(name), value, values)
        if OPTIMIZER_SLOT in obj:
            if VARIABLE_VALUE not in attributes:
                raise ValueError(f"{out.path!r} has slots but no {ATTRIBUTES}/{VARIABLE_VALUE}")
            slot_requests.append((node_id, obj[OPTIMIZER_SLOT]))
    for alias, target in (aliases or {}).items():
        parent, _, name = alias.rpartition("/")
        if parent not in by_path or target not in by_path:
            raise ValueError(f"alias {alias!r} -> {target!r}: no such object in the tree")
        unescaped = unescape_local_name(name)
        parent_proto = nodes[by_path[parent]].proto
        if any(c.local_name == unescaped for c in parent_proto.children):
            continue
        parent_proto.children.add(node_id=by_path[target], local_name=unescaped)
    _add_slots(graph, nodes, by_path, slot_requests, values)
    _mark_values(graph)
    values.sort(key=lambda item: item[0])  # TF's data order: by node, the graph last
    return {key: value for _, key, value in values}, graph.SerializeToString()


def unescape_local_name(name: str) -> str:
    """Undo :func:`escape_local_name`."""
    if "." not in name:
        return name
    return _ESCAPED.sub(lambda m: "/" if m[1] == "S" else m[1], name)


_ESCAPED = re.compile(r"\.(.)", re.DOTALL)


def _variable(
    out: _Out, node_id: int, name: str, value: Any, values: list[tuple[int, str, Any]]
) -> None:
    if _is_object(value):
        raise TypeError(f"{out.path!r}: attribute {name!r} must be an array, not a mapping")
    key = attribute_key(out.path, name)
    values.append((node_id, key, value))
    full_name = "/".join(unescape_local_name(p) for p in out.path.split("/")) if out.path else ""
    out.proto.attributes.add(name=name, full_name=full_name, checkpoint_key=key)


def _add_slots(
    graph: TrackableObjectGraph,
    nodes: list[_Out],
    by_path: dict[str, int],
    requests: list[tuple[int, Mapping[str, Any]]],
    values: list[tuple[int, str, Any]],
) -> None:
    # (optimizer id, slot name, variable id) -> value, numbered as TF does.
    found: dict[tuple[int, str, int], Any] = {}
    slot_order: dict[str, int] = {}
    for var_id, slots in requests:
        if not isinstance(slots, Mapping):
            raise TypeError(f"{nodes[var_id].path!r}: {OPTIMIZER_SLOT} maps optimizer paths")
        for opt_path, by_name in slots.items():
            opt_id = by_path.get(opt_path)
            if not opt_path or opt_id is None or not nodes[opt_id].is_object:
                raise ValueError(f"{nodes[var_id].path!r}: no optimizer object at {opt_path!r}")
            for slot_name, value in by_name.items():
                slot_order.setdefault(slot_name, len(slot_order))
                found[(opt_id, slot_name, var_id)] = value
    for (opt_id, slot_name, var_id), value in sorted(
        found.items(), key=lambda item: (item[0][0], slot_order[item[0][1]], item[0][2])
    ):
        slot_id = len(nodes)
        path = slot_path(nodes[var_id].path, nodes[opt_id].path, slot_name)
        out = _Out(graph.nodes.add(), path, False)
        nodes.append(out)
        _variable(out, slot_id, VARIABLE_VALUE, value, values)
        nodes[opt_id].proto.slot_variables.add(
            original_variable_node_id=var_id, slot_name=slot_name, slot_variable_node_id=slot_id
        )


def _mark_values(graph: TrackableObjectGraph) -> None:
    """``has_checkpoint_values``: a node saves something, or a descendant does (TF's rule)."""
    parents: dict[int, set[int]] = {}
    marked: set[int] = set()
    for node_id, proto in enumerate(graph.nodes):
        if proto.attributes or proto.slot_variables or proto.HasField("registered_saver"):
            marked.add(node_id)
        for ref in proto.children:
            parents.setdefault(ref.node_id, set()).add(node_id)
    todo = list(marked)
    while todo:
        for parent in parents.pop(todo.pop(), ()):
            if parent not in marked:
                marked.add(parent)
                todo.append(parent)
    for node_id, proto in enumerate(graph.nodes):
        proto.has_checkpoint_values.value = node_id in marked


def _reuse_graph(tree: ObjectTree) -> tuple[dict[str, Any], bytes] | None:
    """The tree's own graph and its values at the graph's keys, if the shapes agree."""
    assert tree.graph is not None
    layout = decode_tree_layout(tree.graph)
    try:
        values = dict(_values_at(layout, tree))
    except (KeyError, TypeError):
        return None
    if _count_values(tree) != len(values):
        return None  # the tree has values the graph does not name
    return values, tree.graph


def _values_at(layout: Layout, tree: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    nodes = layout.nodes
    located: dict[int, Any] = {0: tree}
    slot_ids = {i for node in nodes.values() for s in node.slots.values() for i in s.values()}
    for node_id, node in sorted(nodes.items()):  # node order: TF's data order
        if node_id in slot_ids:
            yield node.attributes[VARIABLE_VALUE], located[node_id]
            continue
        here = located[node_id]
        for name, child in node.children:
            if nodes[child].path == _child_path(node.path, name):
                if not isinstance(here, Mapping):
                    raise TypeError(node.path)
                located[child] = here[name]
        if node.is_leaf:
            if _is_object(here):
                raise TypeError(node.path)
            yield node.attributes[VARIABLE_VALUE], here
            continue
        if not isinstance(here, Mapping):
            raise TypeError(node.path)
        for name, key in node.attributes.items():
            yield key, here[ATTRIBUTES][name]
        for opt, slots in node.slots.items():
            for slot, i in slots.items():
                located[i] = here[OPTIMIZER_SLOT][opt][slot]


def _count_values(tree: Mapping[str, Any]) -> int:
    count, stack, seen = 0, [tree], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, value in obj.items():
            if name == ATTRIBUTES:
                count += len(value)
            elif name == OPTIMIZER_SLOT:
                count += sum(len(s) for s in value.values())
            elif _is_object(value):
                stack.append(value)
            else:
                count += 1
    return count


def is_object_graph_checkpoint(keys: set[str] | list[str]) -> bool:
    """Whether a checkpoint's keys include TF2's object graph."""
    return OBJECT_GRAPH_KEY in keys


def graph_value(data: Any) -> bytes:
    """The graph's bytes from the scalar string tensor a reader returns."""
    array = np.asarray(data, dtype=object)
    if array.shape != () or not isinstance(array.item(), bytes):
        raise CorruptCheckpointError(f"{OBJECT_GRAPH_KEY} is not a scalar string tensor")
    value: bytes = array.item()
    return value

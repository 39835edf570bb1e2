"""TF2 object graphs in the command line: ``inspect``'s tree view and JSON, ``convert``'s note
when the target cannot hold the graph, ``diff``'s object-level summary of two graphs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import CorruptCheckpointError
from ..formats.base import CheckpointReader, TensorSpec
from ..object_graph import (
    OBJECT_GRAPH_KEY,
    VARIABLE_VALUE,
    Layout,
    decode_tree_layout,
    escape_local_name,
    graph_value,
)
from ._common import shape_text

#: Formats TensorFlow reads, which keep the object graph in ``convert``.
TF_FORMATS = ("v2", "v1")

DROPPED_NOTE = (
    f"left out {OBJECT_GRAPH_KEY} (the TF2 object graph: {{fmt}} has no string tensors); "
    "the variables keep their TF2 keys, but tf.train.Checkpoint cannot restore the copy by "
    "object (convert to v2 to keep it)"
)


async def read_graph(
    reader: CheckpointReader, keys: Sequence[str] | None = None
) -> tuple[Layout | None, bytes | None, str | None]:
    """(layout, graph bytes, problem) of a checkpoint; all None if it has no object graph.
    ``keys``: the reader's keys, when the caller has them already."""
    if keys is None:
        keys = reader.keys()
    if OBJECT_GRAPH_KEY not in keys:
        return None, None, None
    try:
        data = graph_value(await reader.read(OBJECT_GRAPH_KEY))
        return decode_tree_layout(data, set(keys)), data, None
    except CorruptCheckpointError as e:
        return None, None, str(e)


def _spec_json(key: str, spec: TensorSpec | None) -> dict[str, Any]:
    if spec is None:
        return {"key": key}
    return {"key": key, "dtype": spec.dtype_name, "shape": list(spec.shape)}


def graph_json(layout: Layout, specs: dict[str, TensorSpec]) -> dict[str, Any]:
    """The object graph as JSON: the tree of objects (children, attributes, slots), aliases."""
    nodes = layout.nodes
    made: dict[int, dict[str, Any]] = {}
    slot_ids = {i for n in nodes.values() for s in n.slots.values() for i in s.values()}
    order = [i for i in nodes if i not in slot_ids]
    for node_id in reversed(order):
        node = nodes[node_id]
        entry: dict[str, Any] = {"node": node_id}
        children = {
            name: made[child]
            for name, child in node.children
            if nodes[child].path == _child(node.path, name)
        }
        if children:
            entry["children"] = children
        if node.attributes:
            entry["attributes"] = {
                name: _spec_json(key, specs.get(key)) for name, key in node.attributes.items()
            }
        if node.slots:
            entry["slots"] = {
                opt: {
                    slot: _spec_json(
                        nodes[i].attributes[VARIABLE_VALUE],
                        specs.get(nodes[i].attributes[VARIABLE_VALUE]),
                    )
                    for slot, i in s.items()
                }
                for opt, s in node.slots.items()
            }
        made[node_id] = entry
    return {
        "root": made[0],
        "objects": len(order),
        "variables": sum(VARIABLE_VALUE in nodes[i].attributes for i in order),
        "slot_variables": len(slot_ids),
        "aliases": layout.aliases,
    }


def _child(parent: str, name: str) -> str:
    return f"{parent}/{escape_local_name(name)}" if parent else escape_local_name(name)


def graph_lines(layout: Layout, specs: dict[str, TensorSpec]) -> list[str]:
    """A tree view: objects that hold values (directly or below), indented; each variable with
    its dtype and shape; slots under their variable; then the aliases."""
    info = graph_json(layout, specs)
    lines = [
        f"object graph: {info['objects']} objects, {info['variables']} variables, "
        f"{info['slot_variables']} slot variables, {len(info['aliases'])} aliases"
    ]
    hidden = 0

    def has_values(entry: dict[str, Any]) -> bool:
        return bool(entry.get("attributes") or entry.get("slots")) or any(
            has_values(c) for c in entry.get("children", {}).values()
        )

    stack: list[tuple[str, dict[str, Any], int]] = [
        (name, child, 1) for name, child in reversed(info["root"].get("children", {}).items())
    ]
    while stack:
        name, entry, depth = stack.pop()
        if not has_values(entry):
            hidden += 1
            continue
        pad = "  " * depth
        attributes = entry.get("attributes", {})
        if list(attributes) == [VARIABLE_VALUE] and not entry.get("children"):
            lines.append(f"{pad}{name}  {_spec_text(attributes[VARIABLE_VALUE])}")
        else:
            lines.append(f"{pad}{name}")
            for attr, spec in attributes.items():
                lines.append(f"{pad}  .{attr}  {_spec_text(spec)}")
        for opt, slots in entry.get("slots", {}).items():
            for slot, spec in slots.items():
                lines.append(f"{pad}  [slot {slot} of {opt}]  {_spec_text(spec)}")
        for child_name, child in reversed(entry.get("children", {}).items()):
            stack.append((child_name, child, depth + 1))
    if hidden:
        lines.append(f"  ({hidden} objects without values not shown; --json lists them)")
    for alias, target in info["aliases"].items():
        lines.append(f"  alias {alias} -> {target or '(root)'}")
    return lines


def _spec_text(spec: dict[str, Any]) -> str:
    if "dtype" not in spec:
        return str(spec["key"])
    return f"{spec['dtype']} {shape_text(tuple(spec['shape']))}"


def graph_difference(a: Layout | None, b: Layout | None) -> str:
    """What differs between two object graphs, by object path."""
    if a is None or b is None:
        return "object graph unreadable in " + ("A" if a is None else "B")
    paths_a = {n.path for n in a.nodes.values()}
    paths_b = {n.path for n in b.nodes.values()}
    parts = []
    for label, only in (("A", paths_a - paths_b), ("B", paths_b - paths_a)):
        if only:
            shown = ", ".join(sorted(p or "(root)" for p in only)[:5])
            more = f" (+{len(only) - 5} more)" if len(only) > 5 else ""
            parts.append(f"objects only in {label}: {shown}{more}")
    if a.aliases != b.aliases:
        parts.append("aliases differ")
    return "; ".join(parts) or "same objects, encoded differently (order, full names)"

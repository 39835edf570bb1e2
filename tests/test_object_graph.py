"""TF2's object graph without TensorFlow: names, trees <-> graphs, and hostile graphs (each a
clean CorruptCheckpointError, in bounded time and memory). TF itself is the oracle in
tests/interop/test_tf2_object.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt import sync
from anyckpt._proto.trackable_object_graph_pb2 import TrackableObjectGraph
from anyckpt.errors import CorruptCheckpointError
from anyckpt.object_graph import (
    ATTRIBUTES,
    MAX_DEPTH,
    MAX_NODES,
    OBJECT_GRAPH_KEY,
    OPTIMIZER_SLOT,
    build_tree,
    decode_layout,
    decode_tree_layout,
    encode_tree,
    escape_local_name,
    unescape_local_name,
)
from anyckpt.tf2 import tree_get, tree_set

NAMES = st.text(st.sampled_from("ab./S_-0"), min_size=1, max_size=6).filter(
    lambda n: n not in (ATTRIBUTES, OPTIMIZER_SLOT)
)
LEAVES = st.integers(-(2**31), 2**31 - 1).map(lambda i: np.array([i], np.int64))
TREES = st.recursive(
    LEAVES, lambda kids: st.dictionaries(NAMES, kids, max_size=4), max_leaves=20
).filter(lambda t: isinstance(t, dict))


@given(st.text())
def test_escaping_round_trips_and_leaves_no_slash(name: str) -> None:
    escaped = escape_local_name(name)
    assert "/" not in escaped
    assert unescape_local_name(escaped) == name


def test_keys_are_tensorflows() -> None:
    values, _ = encode_tree({"model": {"a/b.c": np.zeros(1)}, "save_counter": np.int64(1)})
    assert list(values) == [
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE",  # node order: the root's children first
        "model/a.Sb..c/.ATTRIBUTES/VARIABLE_VALUE",
    ]


@settings(max_examples=150, deadline=None)
@given(TREES)
def test_tree_graph_tree_round_trip(tree: dict[str, Any]) -> None:
    values, graph = encode_tree(tree)
    layout = decode_tree_layout(graph, set(values))
    back = build_tree(layout, values)
    assert back == _plain(tree) or _same(back, tree)
    assert not back.aliases


def _plain(tree: Any) -> Any:
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return np.array_equal(a, b)


def test_shared_objects_and_slots() -> None:
    shared = {"w": np.ones(2)}
    tree = {
        "a": shared,
        "b": {"again": shared},
        "v": {
            ATTRIBUTES: {"VARIABLE_VALUE": np.zeros(3)},
            OPTIMIZER_SLOT: {"b": {"m": np.full(3, 2.0), "v": np.full(3, 3.0)}},
        },
    }
    values, graph = encode_tree(tree)
    assert "v/.OPTIMIZER_SLOT/b/m/.ATTRIBUTES/VARIABLE_VALUE" in values
    back = build_tree(decode_tree_layout(graph, set(values)), values)
    assert back.aliases == {"b/again": "a"}
    assert _same(back["v"], tree["v"])
    assert tree_get(back, "b/again/w").tolist() == [1.0, 1.0]  # through the alias
    tree_set(back, "v", np.ones(3))
    assert back["v"][OPTIMIZER_SLOT]["b"]["m"].tolist() == [2.0] * 3  # slots kept


def _graph(*nodes: dict[str, Any]) -> TrackableObjectGraph:
    graph = TrackableObjectGraph()
    for spec in nodes:
        node = graph.nodes.add()
        for node_id, name in spec.get("children", []):
            node.children.add(node_id=node_id, local_name=name)
        for name, key in spec.get("attributes", []):
            node.attributes.add(name=name, checkpoint_key=key)
        for var, slot_name, slot in spec.get("slots", []):
            node.slot_variables.add(
                original_variable_node_id=var, slot_name=slot_name, slot_variable_node_id=slot
            )
    return graph


VAR = {"attributes": [("VARIABLE_VALUE", "k")]}


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (_graph({"children": [(5, "x")]}), "out of range"),
        (_graph({"children": [(-1, "x")]}), "out of range"),
        (_graph({"children": [(1, "x"), (1, "x")]}, {}), "two children named"),
        (_graph({"children": [(1, "")]}, {}), "empty name"),
        (_graph({"children": [(1, ".ATTRIBUTES")]}, {}), "child named"),
        (
            _graph({"children": [(1, "x")]}, {"attributes": [("VARIABLE_VALUE", "gone")]}),
            "does not have",
        ),
        (_graph({"children": [(1, "o")]}, {"slots": [(7, "m", 0)]}), "out of range"),
        # a slot for an object that is no variable
        (
            _graph({"children": [(1, "o"), (2, "p")]}, {"slots": [(2, "m", 3)]}, {}, VAR),
            "not a variable",
        ),
        # a slot "variable" that has children
        (
            _graph(
                {"children": [(1, "o"), (2, "v")]},
                {"slots": [(2, "m", 3)]},
                VAR,
                {"children": [(0, "up")], **VAR},
            ),
            "not a variable",
        ),
        # a slot variable that is also an object of the tree
        (
            _graph({"children": [(1, "o"), (2, "v")]}, {"slots": [(2, "m", 2)]}, VAR),
            "also an object",
        ),
        (_graph({"slots": [(0, "m", 0)]}), "not a variable"),
    ],
)
def test_hostile_graphs_raise_cleanly(graph: TrackableObjectGraph, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        decode_layout(graph, {"k"})


def test_cycles_are_aliases_not_errors() -> None:
    # TF saves objects that refer to each other (tests/interop: a module and its parent).
    graph = _graph(
        {"children": [(1, "a")]}, {"children": [(2, "b")]}, {"children": [(1, "up"), (0, "root")]}
    )
    layout = decode_layout(graph)
    assert layout.aliases == {"a/b/up": "a", "a/b/root": ""}
    assert build_tree(layout, {}) == {"a": {"b": {}}}


def test_a_million_nodes_is_refused_before_parsing() -> None:
    data = b"\x0a\x00" * 1_000_000  # a million empty nodes: 2 MB
    with pytest.raises(CorruptCheckpointError, match=f"over {MAX_NODES} nodes"):
        decode_tree_layout(data)


def test_depth_is_bounded() -> None:
    n = MAX_DEPTH + 5
    chain = [{"children": [(i + 1, "c")]} for i in range(n - 1)] + [{}]
    with pytest.raises(CorruptCheckpointError, match="deeper than"):
        decode_layout(_graph(*chain))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_raise_cleanly(data: bytes) -> None:
    try:
        layout = decode_tree_layout(data)
    except CorruptCheckpointError:
        return
    build_tree(layout, dict.fromkeys(layout.checkpoint_keys(), 0))


def test_read_tree_names_the_checkpoint(tmp_path: Path) -> None:
    plain = str(tmp_path / "plain")
    sync.save(plain, {"w": np.zeros(2)})
    with pytest.raises(CorruptCheckpointError, match=r"plain.*not a TF2"):
        sync.read_tree(plain)
    bad = str(tmp_path / "bad")
    blob = np.empty((), object)
    blob[()] = _graph({"children": [(9, "x")]}).SerializeToString()
    sync.save(bad, {OBJECT_GRAPH_KEY: blob, "x": np.zeros(1)})
    with pytest.raises(CorruptCheckpointError, match=r"bad.*out of range"):
        sync.load(bad, layout="tree")


@pytest.mark.anyio
async def test_save_and_load_tree_async(tmp_path: Path) -> None:
    prefix = str(tmp_path / "t")
    tree = {"model": {"dense": {"kernel": np.eye(2, dtype=np.float32)}}, "step": np.int64(3)}
    await anyckpt.save(prefix, tree, object_graph=True)
    back = await anyckpt.load(prefix, layout="tree")
    assert _same(dict(back), tree)
    assert back.unattached == []
    # Unchanged, it writes the same bytes again (the graph it read is reused).
    again = str(tmp_path / "again")
    await anyckpt.save(again, back, object_graph=True)
    for suffix in (".index", ".data-00000-of-00001"):
        assert Path(again + suffix).read_bytes() == Path(prefix + suffix).read_bytes()


def test_manager_writes_object_graphs_with_save_counter(tmp_path: Path) -> None:
    with sync.CheckpointManager(tmp_path, object_graph=True) as manager:
        manager.save({"model": {"w": np.ones(2)}}, step=7)
        manager.save({"model": {"w": np.ones(2)}, "save_counter": np.int64(1)}, step=8)
    assert sync.read_tree(tmp_path / "ckpt-7")["save_counter"] == 7
    assert sync.read_tree(tmp_path / "ckpt-8")["save_counter"] == 1  # the tree's own wins
    with pytest.raises(ValueError, match="coordinator"):
        anyckpt.CheckpointManager(tmp_path, object_graph=True, coordinator=object())  # type: ignore[arg-type]


def test_remap_replaces_checks_and_keeps_the_rest(tmp_path: Path) -> None:
    source = str(tmp_path / "src")
    tree = {
        "model": {
            "dense": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
        },
        "optimizer": {"iterations": np.int64(10)},
    }
    sync.save(source, tree, object_graph=True)
    dest = str(tmp_path / "dest")
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)  # PyTorch's (out, in)
    sync.remap(
        source,
        dest,
        {"fc.weight": weight},
        lambda name: "model/dense/kernel" if name == "fc.weight" else None,
        transform=lambda path, a: a.T,
    )
    back = sync.read_tree(dest)
    assert back["model"]["dense"]["kernel"].tolist() == weight.T.tolist()
    assert back["optimizer"]["iterations"] == 10
    assert Path(dest + ".index").read_bytes() != Path(source + ".index").read_bytes()
    with pytest.raises(ValueError, match="does not fit"):
        sync.remap(source, dest, {"model/dense/bias": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="does not fit"):
        sync.remap(source, dest, {"model/dense/bias": np.zeros(3, np.float64)})
    with pytest.raises(KeyError, match="maps to no object path"):
        sync.remap(source, dest, {"other": np.zeros(1)}, {})


@st.composite
def _graphs(draw: st.DrawFn) -> TrackableObjectGraph:
    """Small graphs whose ids, names, attributes and slots are often (not always) valid."""
    n = draw(st.integers(1, 6))
    ids = st.integers(-1, n)
    graph = TrackableObjectGraph()
    for _ in range(n):
        node = graph.nodes.add()
        for node_id, name in draw(st.lists(st.tuples(ids, st.sampled_from("ab.")), max_size=3)):
            node.children.add(node_id=node_id, local_name=name)
        if draw(st.booleans()):
            node.attributes.add(name="VARIABLE_VALUE", checkpoint_key=draw(st.sampled_from("kx")))
        for var, slot in draw(st.lists(st.tuples(ids, ids), max_size=2)):
            node.slot_variables.add(
                original_variable_node_id=var, slot_name="m", slot_variable_node_id=slot
            )
    return graph


@settings(max_examples=400, deadline=None)
@given(_graphs())
def test_structured_hostile_graphs(graph: TrackableObjectGraph) -> None:
    """Any graph either raises CorruptCheckpointError or lays out into a tree that writes back
    to a graph with the same objects, values and aliases."""
    try:
        layout = decode_layout(graph, {"k"})
    except CorruptCheckpointError:
        return
    values = {key: np.array([i]) for i, key in enumerate(layout.checkpoint_keys())}
    tree = build_tree(layout, values)
    again, data = encode_tree(dict(tree), aliases=tree.aliases)
    relaid = decode_tree_layout(data, set(again))
    assert _same(build_tree(relaid, again), tree)
    assert relaid.aliases == layout.aliases

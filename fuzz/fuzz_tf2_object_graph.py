"""atheris: TF2's ``_CHECKPOINTABLE_OBJECT_GRAPH`` (a serialized TrackableObjectGraph): parsing
within bounds, validation (ids, names, slots, depth), laying it out as a tree, and writing a
tree that passed back out (which must lay out to the same paths).

Seeds: fuzz/corpus/tf2_object_graph/ (graphs made by anyckpt.object_graph.encode_tree).
"""

from __future__ import annotations

from _harness import EXPECTED, main

from anyckpt.object_graph import build_tree, decode_tree_layout, encode_tree


def test_one_input(data: bytes) -> None:
    try:
        layout = decode_tree_layout(data)
    except EXPECTED:
        return
    values = {key: len(key) for key in layout.checkpoint_keys()}  # a stand-in value per key
    tree = build_tree(layout, values)
    again, graph = encode_tree(dict(tree), aliases=tree.aliases)
    relaid = decode_tree_layout(graph, set(again))
    paths = {n.path for n in layout.nodes.values()}
    assert {n.path for n in relaid.nodes.values()} <= paths | set(layout.aliases), "paths changed"


if __name__ == "__main__":
    main(test_one_input)

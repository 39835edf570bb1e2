"""atheris: TF2's ``_CHECKPOINTABLE_OBJECT_GRAPH`` (a serialized TrackableObjectGraph):
parsing within bounds, validation (ids, names, slots, depth), laying it out as a tree, and
writing a tree that passed back out (which must lay out to the same paths). Checksums: none."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_tf2_object_graph")

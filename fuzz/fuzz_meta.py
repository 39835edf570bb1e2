"""atheris: a ``.meta`` file (TensorFlow's MetaGraphDef, binary or text), decoded by
anyckpt.meta.decode_meta_graph (variables, the saver's restore subgraph and its string Consts,
collections) and rendered as ``anyckpt inspect`` shows it. Checksums: none to bypass."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_meta")

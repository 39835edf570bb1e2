"""atheris: the LevelDB-style table of a V2 ``.index`` (anyckpt.codecs.table.read_table)."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_table")

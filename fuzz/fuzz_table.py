"""atheris: the LevelDB-style table of a V2 ``.index`` (anyckpt.codecs.table.read_table)."""

from __future__ import annotations

import contextlib

from _harness import EXPECTED, main

from anyckpt.codecs.table import read_table


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(*EXPECTED):
        read_table(data)


if __name__ == "__main__":
    main(test_one_input)

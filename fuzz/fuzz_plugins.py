"""atheris: the plugin formats' files (anyckpt-safetensors, anyckpt-zstd), read through the
format registry: headers, footers, offsets, compressed chunks, strings. Input: one byte (even:
safetensors, odd: zstd), then the file."""

from __future__ import annotations

import contextlib

from _harness import EXPECTED, main, read_everything, run_async, write_files

SUFFIX = {"safetensors": ".safetensors", "zstd": ".zckpt"}


def test_one_input(data: bytes) -> None:
    if not data:
        return
    fmt = "zstd" if data[0] & 1 else "safetensors"
    url = write_files({"model" + SUFFIX[fmt]: data[1:]})
    with contextlib.suppress(*EXPECTED):
        run_async(read_everything, f"{url}/model", fmt)


if __name__ == "__main__":
    main(test_one_input)

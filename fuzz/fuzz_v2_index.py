"""atheris: a V2 checkpoint: the ``.index`` (table, header, bundle entries, OrderedCode slice
keys, partitions), parsed and validated into a reader, then every tensor read from its data
file. Input: 2 bytes little-endian N, N bytes of data file, the rest is the index."""

from __future__ import annotations

import contextlib

from _harness import EXPECTED, main, read_everything, run_async, write_files


def split(data: bytes) -> tuple[bytes, bytes]:
    size = int.from_bytes(data[:2], "little")
    return data[2 : 2 + size], data[2 + size :]


def test_one_input(data: bytes) -> None:
    shard, index = split(data)
    url = write_files(
        {"ckpt.index": index, "ckpt.data-00000-of-00001": shard, "ckpt.data-00000-of-00002": shard}
    )
    with contextlib.suppress(*EXPECTED):
        run_async(read_everything, f"{url}/ckpt", "v2")


if __name__ == "__main__":
    main(test_one_input)

"""atheris: a V2 checkpoint: the ``.index`` (table, header, bundle entries, OrderedCode slice
keys, partitions), parsed and validated into a reader, then every tensor read from its data
file. Input: 2 bytes little-endian N, N bytes of data file, the rest is the index. Checksum
comparisons are bypassed (``fuzz_v2_checksums`` is the same with them on)."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_v2_index")

"""atheris: ``fuzz_v2_index`` with every checksum comparison on (block CRCs, the header's
and each tensor's masked CRC-32C): what a real reader does. Same input layout: 2 bytes
little-endian N, N bytes of data file, the rest is the index."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_v2_checksums")

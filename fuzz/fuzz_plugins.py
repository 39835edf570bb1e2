"""atheris: the plugin formats' files (anyckpt-safetensors, anyckpt-zstd), read through the
format registry: headers, footers, offsets, compressed chunks, strings. Input: one byte (even:
safetensors, odd: zstd), then the file."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_plugins")

"""Hostile safetensors headers: each is refused with ``CorruptCheckpointError`` naming the file,
before anything is allocated beyond the header itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

import anyckpt
import anyckpt.sync


def write(path: Path, header: bytes, data: bytes = b"", declared: int | None = None) -> Path:
    n = len(header) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def refused(path: Path, match: str) -> str:
    with (
        pytest.raises(anyckpt.CorruptCheckpointError, match=match) as info,
        anyckpt.sync.open(path, format="safetensors") as reader,
    ):
        reader.read_many()
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_declared_header_length_larger_than_the_file(tmp_path: Path) -> None:
    header = json.dumps({"a": entry("U8", [4], 0, 4)}).encode()
    path = write(tmp_path / "x.safetensors", header, b"\0" * 4, declared=len(header) + 5)
    refused(path, "past the end")
    refused(write(tmp_path / "y.safetensors", b"{}", declared=(1 << 64) - 1), "larger than")


def test_deeply_nested_json_is_a_corrupt_checkpoint_not_a_recursion_error(
    tmp_path: Path,
) -> None:
    depth = 100_000
    header = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    refused(write(tmp_path / "deep.safetensors", header), "not valid JSON")
    header = b'{"a":' + b'{"b":' * depth + b"1" + b"}" * depth + b"}"
    refused(write(tmp_path / "deep2.safetensors", header), "not valid JSON")


@pytest.mark.parametrize("begin", [1 << 40, 1 << 70, (1 << 64) - 4])
def test_huge_offsets_are_refused(tmp_path: Path, begin: int) -> None:
    header = json.dumps({"a": entry("U8", [4], begin, begin + 4)}).encode()
    refused(write(tmp_path / "big.safetensors", header, b"\0" * 4), "starts at")


def test_overlapping_ranges_are_refused(tmp_path: Path) -> None:
    header = json.dumps({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}).encode()
    refused(write(tmp_path / "o.safetensors", header, b"\0" * 6), "starts at 2")


def test_an_entry_count_bomb_is_bounded_by_the_bytes_the_file_holds(tmp_path: Path) -> None:
    """50,000 entries of 4 bytes each over a 4-byte buffer: refused (the entries must tile the
    buffer, so their number is bounded by the file's bytes, plus zero-size entries by the
    header's own bytes)."""
    header = json.dumps({f"t{i}": entry("F32", [1], 4 * i, 4 * i + 4) for i in range(50_000)})
    refused(write(tmp_path / "bomb.safetensors", header.encode(), b"\0" * 4), "cover")


def test_parsing_a_large_header_allocates_a_bounded_multiple_of_its_bytes() -> None:
    """20,000 entries: the parse peaks under 10x the header's bytes (a dict per entry, as
    ``json.loads`` builds by default, took ~13x)."""
    import tracemalloc

    import numpy as np
    from anyckpt_safetensors import codec

    shapes = {f"t{i:07d}": (np.dtype(np.float32), (1,)) for i in range(20_000)}
    head, _ = codec.encode_header(shapes)
    text = head[8:]
    tracemalloc.start()
    try:
        header = codec.decode_header(text, len(head) + 4 * len(shapes))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(header.entries) == len(shapes)
    assert header.entries["t0000007"] == codec.Entry("F32", (1,), 28, 32)
    assert peak < 10 * len(text)

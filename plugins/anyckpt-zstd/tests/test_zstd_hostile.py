"""Hostile anyckpt-zstd headers: each is refused with ``CorruptCheckpointError`` naming the
file (the header's checksum is made to match, as an attacker would)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from anyckpt_zstd import codec

import anyckpt
import anyckpt.sync


def write(path: Path, header: bytes, frames: bytes = b"") -> Path:
    path.write_bytes(frames + header + codec.encode_footer(len(frames), header))
    return path


def body(tensors: dict[str, Any]) -> bytes:
    return json.dumps({"format": "anyckpt-zstd", "version": 1, "tensors": tensors}).encode()


def refused(path: Path, match: str) -> str:
    with (
        pytest.raises(anyckpt.CorruptCheckpointError, match=match) as info,
        anyckpt.sync.open(path, format="zstd") as reader,
    ):
        reader.read_many()
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_declared_header_length_larger_than_the_file(tmp_path: Path) -> None:
    header = body({})
    path = tmp_path / "x.zckpt"
    footer = codec.FOOTER.pack(codec.MAGIC, 0, len(header) + 100, 0, codec.VERSION)
    path.write_bytes(header + footer)
    refused(path, "does not end at the footer")
    footer = codec.FOOTER.pack(codec.MAGIC, 0, (1 << 64) - 1, 0, codec.VERSION)
    path.write_bytes(header + footer)
    refused(path, "does not end at the footer")


def test_deeply_nested_json_is_a_corrupt_checkpoint_not_a_recursion_error(
    tmp_path: Path,
) -> None:
    depth = 100_000
    header = b'{"format":"anyckpt-zstd","tensors":' + b"[" * depth + b"]" * depth + b"}"
    refused(write(tmp_path / "deep.zckpt", header), "not valid JSON")


@pytest.mark.parametrize("offset", [1 << 40, 1 << 70, (1 << 64) - 1])
def test_huge_offsets_are_refused(tmp_path: Path, offset: int) -> None:
    chunk = [offset, 8, 16, 0]
    t = {"dtype": 1, "shape": [4], "layout": "raw", "chunks": [chunk]}
    refused(write(tmp_path / "big.zckpt", body({"t": t}), b"\0" * 16), "outside the data")


def test_overlapping_chunks_are_refused(tmp_path: Path) -> None:
    a = {"dtype": 1, "shape": [4], "layout": "raw", "chunks": [[0, 8, 16, 0]]}
    b = {"dtype": 1, "shape": [4], "layout": "raw", "chunks": [[4, 8, 16, 0]]}
    refused(write(tmp_path / "o.zckpt", body({"a": a, "b": b}), b"\0" * 16), "overlap")


def test_an_entry_count_bomb_is_bounded_by_the_bytes_the_file_holds(tmp_path: Path) -> None:
    """50,000 entries whose chunks each claim 8 compressed bytes in a 16-byte data section:
    refused, since the chunks may neither overlap nor leave the data."""
    tensors = {
        f"t{i}": {"dtype": 1, "shape": [4], "layout": "raw", "chunks": [[8 * i, 8, 16, 0]]}
        for i in range(50_000)
    }
    refused(write(tmp_path / "bomb.zckpt", body(tensors), b"\0" * 16), "outside the data")


def test_zero_size_chunks_cannot_claim_data(tmp_path: Path) -> None:
    t = {"dtype": 1, "shape": [4], "layout": "raw", "chunks": [[0, 0, 16, 0]]}
    refused(write(tmp_path / "z.zckpt", body({"t": t}), b"\0" * 16), "ratio limit")

"""``anyckpt verify`` reads in ``read_many`` batches and still names every damaged tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import anyckpt
from anyckpt.cli import _verify, main
from anyckpt.formats.base import TensorSpec
from anyckpt.formats.v2_reader import V2Reader


@given(
    sizes=st.lists(st.integers(0, 40), max_size=60),
    keys_cap=st.integers(1, 7),
    bytes_cap=st.integers(1, 100),
)
def test_batches_keep_order_and_respect_both_bounds(
    sizes: list[int], keys_cap: int, bytes_cap: int
) -> None:
    keys = [f"k{i:03d}" for i in range(len(sizes))]
    specs = {k: TensorSpec(np.dtype(np.uint8), (n,)) for k, n in zip(keys, sizes, strict=True)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_verify, "BATCH_KEYS", keys_cap)
        mp.setattr(_verify, "BATCH_BYTES", bytes_cap)
        batches = list(_verify._batches(iter(keys), specs.__getitem__))
    assert [k for b, _ in batches for k in b] == keys
    for batch, nbytes in batches:
        assert 1 <= len(batch) <= keys_cap
        held = sum(sizes[keys.index(k)] for k in batch)
        assert nbytes == held
        assert held <= bytes_cap or len(batch) == 1


def _flip(data_file: Path, array: np.ndarray) -> None:
    data = bytearray(data_file.read_bytes())
    needle = array.tobytes()
    assert data.count(needle) == 1
    data[data.index(needle)] ^= 0x01
    data_file.write_bytes(bytes(data))


def test_damage_inside_a_batch_is_named_per_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """30 tensors in batches of 8: the clean batches take one ``read_many`` and no per-key
    read; only the batches holding the two flipped tensors are read again key by key, and the
    report names exactly those two, as a key-by-key pass would."""
    tensors = {f"t{i:02d}": np.arange(16, dtype=np.int64) * 1000 + i for i in range(30)}
    anyckpt.sync.save(tmp_path / "m-1", tensors)
    data_file = tmp_path / "m-1.data-00000-of-00001"
    _flip(data_file, tensors["t03"])
    _flip(data_file, tensors["t20"])
    monkeypatch.setattr(_verify, "BATCH_KEYS", 8)
    calls: dict[str, int] = {"read": 0, "read_many": 0}
    real_read, real_many = V2Reader.read, V2Reader.read_many

    async def read(self: V2Reader, key: str, *args: Any, **kwargs: Any) -> np.ndarray:
        calls["read"] += 1
        return await real_read(self, key, *args, **kwargs)

    async def read_many(self: V2Reader, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        calls["read_many"] += 1
        return await real_many(self, *args, **kwargs)

    monkeypatch.setattr(V2Reader, "read", read)
    monkeypatch.setattr(V2Reader, "read_many", read_many)
    assert main(["verify", str(tmp_path / "m-1"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    [checkpoint] = doc["checkpoints"]
    assert [p["tensor"] for p in checkpoint["problems"]] == ["t03", "t20"]
    assert all(p["file"] == str(data_file) for p in checkpoint["problems"])
    assert all("checksum mismatch" in p["error"] for p in checkpoint["problems"])
    assert checkpoint["tensors"] == 30
    assert checkpoint["bytes"] == 28 * 16 * 8
    assert calls == {"read_many": 4, "read": 16}  # 4 batches; 2 of them again key by key


def test_many_tensors_verify_ok_with_few_read_many_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = {f"t{i:05d}": np.full(2, i, np.float32) for i in range(5000)}
    anyckpt.sync.save(tmp_path / "m-1", tensors)
    calls = {"read": 0, "read_many": 0}
    real_read, real_many = V2Reader.read, V2Reader.read_many

    async def read(self: V2Reader, key: str, *args: Any, **kwargs: Any) -> np.ndarray:
        calls["read"] += 1
        return await real_read(self, key, *args, **kwargs)

    async def read_many(self: V2Reader, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        calls["read_many"] += 1
        return await real_many(self, *args, **kwargs)

    monkeypatch.setattr(V2Reader, "read", read)
    monkeypatch.setattr(V2Reader, "read_many", read_many)
    assert main(["verify", str(tmp_path / "m-1")]) == 0
    out = capsys.readouterr().out
    assert "5,000 tensors" in out or "5000 tensors" in out
    assert "1 of 1 checkpoint ok" in out
    assert calls["read"] == 0
    assert calls["read_many"] == -(-5000 // _verify.BATCH_KEYS)

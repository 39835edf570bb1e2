"""anyckpt-safetensors: byte identity with the reference package, round trips, conversion of a
TF checkpoint, registration, and damaged headers."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from anyckpt_safetensors import SafetensorsFormat, codec
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import anyckpt
import anyckpt.sync
from anyckpt.partitioned import Partitioned

st_numpy = pytest.importorskip("safetensors.numpy")  # the reference, as an oracle

#: The TF-written fixtures of the anyckpt repository this plugin lives in (tests/fixture_paths.py).
FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "tf-2.21"
DTYPES = list(codec.DTYPES.values())


def random_array(seed: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.bytes(int(np.prod(shape)) * dtype.itemsize)
    out = np.frombuffer(raw, dtype=np.uint8).copy()
    if dtype == np.bool_:
        out &= 1
    return out.view(dtype).reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=6, unique=True))
    out = {}
    for name in names:
        if name == "__metadata__":
            continue
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        out[name] = random_array(draw(st.integers(0, 2**31)), dtype, shape)
    return out


@settings(max_examples=100, deadline=None)
@given(tensors=tensor_dicts(), with_metadata=st.booleans())
def test_bytes_equal_the_reference_and_round_trip(
    tmp_path_factory: pytest.TempPathFactory, tensors: dict[str, np.ndarray], with_metadata: bool
) -> None:
    # One key: the reference keeps metadata in a hash map, whose order is arbitrary.
    metadata = {"ü format": "pt"} if with_metadata else None
    directory = tmp_path_factory.mktemp("st")
    options = {"metadata": metadata} if metadata else None
    (path,) = anyckpt.sync.save(directory / "m", tensors, format="safetensors", options=options)
    assert path == str(directory / "m.safetensors")
    data = Path(path).read_bytes()
    assert data == st_numpy.save(tensors, metadata=metadata)
    ml = {np.dtype(t) for t in (ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16)}
    if not any(v.dtype in ml for v in tensors.values()):
        theirs = st_numpy.load(data)  # (its NumPy loader has no bfloat16 or float8)
        assert all(same(theirs[k], v) for k, v in tensors.items())
    loaded = anyckpt.sync.load(directory / "m")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert same(loaded[key], value), key


def test_reads_what_the_reference_writes(tmp_path: Path) -> None:
    tensors = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "bf": np.arange(5).astype(ml_dtypes.bfloat16),
        "e": np.zeros((0, 7), np.int64),
        "s": np.array(True),
    }
    (tmp_path / "ref.safetensors").write_bytes(st_numpy.save(tensors, metadata={"a": "b"}))
    with anyckpt.sync.open(tmp_path / "ref") as reader:
        assert reader.keys() == ["bf", "e", "s", "w"]
        assert reader.spec("w").shape == (3, 4)
        assert reader.spec("bf").dtype == np.dtype(ml_dtypes.bfloat16)
        assert reader.spec("w").nbytes == 48
        assert same(reader.read("w", (slice(1, 3), 2)), tensors["w"][1:3, 2])
        assert same(reader.read("w", -1), tensors["w"][-1])
        assert same(reader.read("e"), tensors["e"])
        assert same(reader.read("s"), tensors["s"])
        with pytest.raises(IndexError):
            reader.read("w", 3)
        with pytest.raises(KeyError):
            reader.read("nope")


def test_the_format_is_registered_and_detected(tmp_path: Path) -> None:
    assert "safetensors" in anyckpt.available_formats()
    assert isinstance(anyckpt.get_format("safetensors"), SafetensorsFormat)
    anyckpt.sync.save(tmp_path / "x", {"a": np.ones(2)}, format="safetensors")
    with anyckpt.sync.open(tmp_path / "x") as reader:  # no format given: detected
        assert reader.files() == [str(tmp_path / "x.safetensors")]
    with anyckpt.sync.open(tmp_path / "x.safetensors") as reader:
        assert reader.keys() == ["a"]


def test_converts_a_tf_checkpoint_and_back(tmp_path: Path) -> None:
    source = FIXTURES / "v2_partitioned" / "model.ckpt-1"
    tensors = anyckpt.sync.load(source)
    with anyckpt.sync.open(source) as reader:
        specs = {k: reader.spec(k) for k in reader.keys()}  # noqa: SIM118
    numeric = {k: v for k, v in tensors.items() if v.dtype != object}
    as_partitioned = {
        k: Partitioned.from_full(v, [p.extents for p in specs[k].partitions])
        if specs[k].partitions
        else v
        for k, v in numeric.items()
    }
    anyckpt.sync.save(tmp_path / "m", as_partitioned, format="safetensors")
    with anyckpt.sync.open(tmp_path / "m") as reader:
        for key in numeric:
            assert reader.spec(key).partitions == specs[key].partitions, key
    back = anyckpt.sync.load(tmp_path / "m")
    anyckpt.sync.save(tmp_path / "tf", back, format="v2")
    again = anyckpt.sync.load(tmp_path / "tf")
    for key, value in numeric.items():
        assert same(again[key], value), key
    with pytest.raises(anyckpt.UnsupportedFormatError, match="part/str"):
        anyckpt.sync.save(tmp_path / "s", {"part/str": tensors["part/str"]}, format="safetensors")


@pytest.mark.parametrize("dtype", [np.complex128, ml_dtypes.int4, ml_dtypes.float8_e4m3fnuz])
def test_dtypes_without_a_safetensors_code_are_refused(tmp_path: Path, dtype: Any) -> None:
    with pytest.raises(anyckpt.UnsupportedFormatError, match="safetensors has no dtype"):
        anyckpt.sync.save(tmp_path / "x", {"t": np.zeros(2, dtype)}, format="safetensors")
    assert os.listdir(tmp_path) == []


# -- damaged files ------------------------------------------------------------------------


def load_as_safetensors(prefix: Path) -> dict[str, np.ndarray]:
    with anyckpt.sync.open(prefix, format="safetensors") as reader:
        return reader.read_many()


def with_header(header: Any, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short"),
        (struct.pack("<Q", 1 << 60) + b"{}", "larger than"),
        (struct.pack("<Q", 50) + b"{}", "past the end"),
        (with_header(None, raw=b"[1]"), "does not start"),
        (with_header(None, raw=b"{\xff}"), "not valid JSON"),
        (with_header(None, raw=b'{"a":1,"a":2}'), "duplicate"),
        (with_header(GOOD, b"\0" * 4), "cover 8 bytes, the buffer has 4"),
        (with_header(GOOD, b"\0" * 9), "cover 8 bytes, the buffer has 9"),
        (with_header({"a": {**GOOD["a"], "dtype": "F33"}}, b"\0" * 8), "unknown dtype"),
        (with_header({"a": {**GOOD["a"], "shape": [1 << 62, 1 << 62]}}), "do not hold"),
        (with_header({"a": {**GOOD["a"], "shape": [-1]}}), "non-negative"),
        (with_header({"a": {**GOOD["a"], "extra": 1}}, b"\0" * 8), "exactly"),
        (
            with_header(
                {**GOOD, "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8
            ),
            "starts at 4",
        ),
        (with_header({"__metadata__": {"x": 1}}), "__metadata__"),
    ],
)
def test_damaged_headers_are_refused_quickly(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.safetensors").write_bytes(content)
    started = time.monotonic()
    with pytest.raises(anyckpt.CorruptCheckpointError, match=message):
        load_as_safetensors(tmp_path / "bad")
    assert time.monotonic() - started < 5


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    data = st_numpy.save({"a": np.arange(5, dtype=np.int16), "b": np.ones((2, 2))})
    for size in range(len(data)):
        (tmp_path / "t.safetensors").write_bytes(data[:size])
        with pytest.raises(anyckpt.CorruptCheckpointError):
            load_as_safetensors(tmp_path / "t")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_headers_never_crash(data: bytes) -> None:
    try:
        header = codec.decode_header(b"{" + data, 1 << 20)
    except codec.HeaderError:
        return
    assert all(e.end >= e.begin for e in header.entries.values())


def test_a_full_read_of_many_tiny_tensors_goes_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is made per range lives for one batch of at most ``_BATCH_TENSORS`` tensors, not
    for the whole read (issue 18: 10^6 tensors of 16 bytes fit one 64 MiB batch)."""
    import anyckpt_safetensors.format as st_format

    from anyckpt.storage.local import LocalReader

    tensors = {f"t{i:03d}": np.full(4, i, np.float32) for i in range(50)}
    anyckpt.sync.save(tmp_path / "m", tensors, format="safetensors")
    monkeypatch.setattr(st_format, "_BATCH_TENSORS", 8)
    batches: list[int] = []
    original = LocalReader.read_ranges_into

    def counting(self: LocalReader, requests: Any) -> None:
        batches.append(len(requests))
        original(self, requests)

    monkeypatch.setattr(LocalReader, "read_ranges_into", counting)
    loaded = anyckpt.sync.load(tmp_path / "m")
    assert list(loaded) == list(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)
    assert sum(batches) == 50
    assert max(batches) == 8
